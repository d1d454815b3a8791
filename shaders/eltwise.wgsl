// Elementwise activations and dropout, forward and backward side by side,
// and the gradient sum used where a tensor feeds several consumers.

struct Eltwise {
    len: u32,
    salt: u32,      // dropout: distinguishes layers
    threshold: u32, // dropout: drop where hash < threshold (p * 2^32)
    scale: f32,     // dropout: 1 / (1 - p)
    sample: u32,    // elements per sample
    _pad: u32,
    // graph::Layout of each tensor: (offset, sample stride)
    x_at: vec2<u32>,
    y_at: vec2<u32>,
    dy_at: vec2<u32>,
    out_at: vec2<u32>,
}

@group(0) @binding(0) var<uniform> p: Eltwise;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Dropout's random stream: [seed, training steps so far].
@group(0) @binding(5) var<storage, read_write> rng: array<u32>;
// x, y, dy and out as vec4s, for the *_quads kernels.
@group(0) @binding(6) var<storage, read> x_quads: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> y_quads: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> dy_quads: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> out_quads: array<vec4<f32>>;

fn at_x(i: u32) -> u32 { return strided(p.x_at, p.sample, i); }
fn at_y(i: u32) -> u32 { return strided(p.y_at, p.sample, i); }
fn at_dy(i: u32) -> u32 { return strided(p.dy_at, p.sample, i); }
fn at_out(i: u32) -> u32 { return strided(p.out_at, p.sample, i); }

@compute @workgroup_size(WG)
fn sigmoid_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activation(SIGMOID, x[at_x(i)]);
    }
}

// d sigmoid(x) / dx = y (1 - y), from the saved output y.
@compute @workgroup_size(WG)
fn sigmoid_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activation_backward(SIGMOID, y[at_y(i)], dy[at_dy(i)]);
    }
}

@compute @workgroup_size(WG)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activation(RELU, x[at_x(i)]);
    }
}

// PyTorch passes no gradient where the output was clamped (x <= 0).
@compute @workgroup_size(WG)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activation_backward(RELU, y[at_y(i)], dy[at_dy(i)]);
    }
}

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activate(x[at_x(i)] + y[at_y(i)]);
    }
}

// A sum of two gradients carried on through the backward of the activation
// whose output is bound as dy (graph::fusion: ResNet's block outputs, where
// the gradient sum feeds the block's ReLU backward): the sum is never
// written.
@compute @workgroup_size(WG)
fn add_activation_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = activation_backward(ACTIVATION, dy[at_dy(i)], x[at_x(i)] + y[at_y(i)]);
    }
}

// A 32-bit integer hash (low bias, full avalanche).
fn mix(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// Inverted dropout's factor for element i in this step: 0 or 1 / (1 - p).
// The same (seed, layer, step, element) gives the same mask, so backward
// recomputes it instead of storing it.
fn dropout_factor(i: u32) -> f32 {
    let h = mix(mix(mix(rng[0] ^ p.salt) + rng[1]) + i);
    return select(p.scale, 0.0, h < p.threshold);
}

@compute @workgroup_size(WG)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = x[at_x(i)] * dropout_factor(i);
    }
}

@compute @workgroup_size(WG)
fn dropout_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = dy[at_dy(i)] * dropout_factor(i);
    }
}

// After a training step: the stream moves on by `len` steps (1), so the
// next step draws new masks.
@compute @workgroup_size(WG)
fn advance_rng(@builtin(local_invocation_index) lane: u32) {
    if (lane == 0u) {
        rng[1] += p.len;
    }
}

// Activations (ACTIVATION), their backward and the sum four elements at a
// time, where samples and layouts are whole vec4s: one vec4 load per input
// and one store for four elements (CPU adapters access memory one lane at a
// time, a vec4 at about the cost of a float).
@compute @workgroup_size(WG)
fn activation_forward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = activate4(x_quads[at_x(i) / 4u]);
    }
}

@compute @workgroup_size(WG)
fn activation_backward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = activation_backward4(y_quads[at_y(i) / 4u], dy_quads[at_dy(i) / 4u]);
    }
}

@compute @workgroup_size(WG)
fn add_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = activate4(x_quads[at_x(i) / 4u] + y_quads[at_y(i) / 4u]);
    }
}

@compute @workgroup_size(WG)
fn add_activation_backward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = activation_backward4(dy_quads[at_dy(i) / 4u], x_quads[at_x(i) / 4u] + y_quads[at_y(i) / 4u]);
    }
}

// Zeros over all of out: the phases of a strided convolution's data
// gradient that no kernel tap reaches (a 1x1 kernel with stride 2 reaches a
// quarter of dx), written in one pass instead of by a product with no terms.
@compute @workgroup_size(WG)
fn zeros(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = 0.0;
    }
}

@compute @workgroup_size(WG)
fn zeros_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = vec4<f32>(0.0);
    }
}

// x into out at out_at (a weight into its rows of the weights concatenated
// along the output channels).
@compute @workgroup_size(WG)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[at_out(i)] = x[at_x(i)];
    }
}

@compute @workgroup_size(WG)
fn copy_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(gid, nwg);
    if (i < p.len) {
        out_quads[at_out(i) / 4u] = x_quads[at_x(i) / 4u];
    }
}
