// Optimizer steps over the flat parameter and gradient buffers (torch.optim
// semantics). Each invocation updates four parameters.

struct Sgd {
    len: u32, // vec4 count
    lr: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Sgd;
@group(0) @binding(1) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> param: array<vec4<f32>>;

// w -= lr * g
@compute @workgroup_size(WG)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        param[i] -= p.lr * grad[i];
    }
}
