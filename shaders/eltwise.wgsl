// Elementwise activations, forward and backward side by side, and the
// gradient sum used where a tensor feeds several consumers.

struct Eltwise {
    len: u32,
}

@group(0) @binding(0) var<uniform> p: Eltwise;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn sigmoid_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[i] = 1.0 / (1.0 + exp(-x[i]));
    }
}

// d sigmoid(x) / dx = y (1 - y), from the saved output y.
@compute @workgroup_size(WG)
fn sigmoid_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[i] = dy[i] * y[i] * (1.0 - y[i]);
    }
}

@compute @workgroup_size(WG)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[i] = max(x[i], 0.0);
    }
}

// PyTorch passes no gradient where the output was clamped (x <= 0).
@compute @workgroup_size(WG)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[i] = select(0.0, dy[i], y[i] > 0.0);
    }
}

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        out[i] = x[i] + y[i];
    }
}
