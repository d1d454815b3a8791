// Prepended to every shader in this folder.

// Invocations per workgroup; each adapter gets its own value (lavapipe runs a
// workgroup as 8-wide SIMD, real GPUs want 64-256).
override WG: u32 = 64u;

// 1-D dispatches larger than 65,535 workgroups are split over a 2-D grid
// (gpu::grid); this rebuilds the flat invocation index.
fn linear_index(gid: vec3<u32>, num_workgroups: vec3<u32>) -> u32 {
    return gid.x + gid.y * num_workgroups.x * WG;
}

// Tiled dispatches (gpu::tiled_grid) keep a block index in y that is the same
// for every invocation of a workgroup, and fold the lane groups into x and z.
fn lane_group(wid: vec3<u32>, num_workgroups: vec3<u32>) -> u32 {
    return wid.x + wid.z * num_workgroups.x;
}

// Flat element i of a tensor whose samples lie as graph::Layout says:
// `at` = (offset, sample stride), `sample` = elements per sample. A channel
// slice of a concatenation is not contiguous across samples.
fn strided(at: vec2<u32>, sample: u32, i: u32) -> u32 {
    let s = quotient(i, sample);
    return at.x + s * at.y + (i - s * sample);
}

// n / d for 0 < d < 2^30, exact for every n. CPU adapters divide integers
// one SIMD lane at a time (x86 has no vector integer division), which made
// index arithmetic the cost of pooling and elementwise kernels; this divides
// in f32 and corrects the estimate twice (checked against integer division
// on every n within 2^21 of 0 and of 2^32 and on 1.2e8 random pairs).
fn quotient(n: u32, d: u32) -> u32 {
    let q0 = u32(f32(n) / f32(d));
    let r0 = bitcast<i32>(n - q0 * d);
    let q1 = bitcast<u32>(bitcast<i32>(q0) + i32(floor(f32(r0) / f32(d))));
    let r1 = bitcast<i32>(n - q1 * d);
    return select(select(q1, q1 + 1u, r1 >= i32(d)), q1 - 1u, r1 < 0);
}

// The activation a kernel applies to what it stores: convolutions and
// matrix products followed by a ReLU or sigmoid run it in their epilogue
// (graph::fusion), as does batch norm; this saves a pass over the output.
// Values match ops::fused::activation_constant.
const NO_ACTIVATION = 0u;
const RELU = 1u;
const SIGMOID = 2u;
override ACTIVATION: u32 = NO_ACTIVATION;

// ReLU as a select, not max(): llvmpipe lowers max() with NaN handling
// that cost a fused convolution 13% (GoogLeNet's 3x3 64 -> 192 forward:
// 483 -> 420 ms), and the select passes NaN through as PyTorch does.
fn activation(kind: u32, v: f32) -> f32 {
    if (kind == RELU) {
        return select(v, 0.0, v < 0.0);
    }
    if (kind == SIGMOID) {
        return 1.0 / (1.0 + exp(-v));
    }
    return v;
}

fn activate(v: f32) -> f32 {
    return activation(ACTIVATION, v);
}

fn activate4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
}

// The gradient reaching an activation's input from `dy` at its output, from
// its output `y` (PyTorch passes no gradient where ReLU clamped).
fn activation_backward(kind: u32, y: f32, dy: f32) -> f32 {
    if (kind == RELU) {
        return select(0.0, dy, y > 0.0);
    }
    if (kind == SIGMOID) {
        return dy * y * (1.0 - y);
    }
    return dy;
}

fn activation_backward4(y: vec4<f32>, dy: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(
        activation_backward(ACTIVATION, y.x, dy.x),
        activation_backward(ACTIVATION, y.y, dy.y),
        activation_backward(ACTIVATION, y.z, dy.z),
        activation_backward(ACTIVATION, y.w, dy.w),
    );
}
