// Optimizer steps over the flat parameter and gradient buffers, with
// torch.optim's semantics (torch.optim.SGD and torch.optim.Adam, defaults
// dampening 0, no Nesterov, no AMSGrad). Each invocation updates four
// parameters; the state buffers share the parameters' layout.

struct Optim {
    len: u32, // vec4 count
    lr: f32,
    weight_decay: f32,
    momentum: f32, // SGD's momentum, Adam's beta1
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
}

// Adam's step count and this step's bias corrections.
struct AdamStep {
    count: u32,
    step_size: f32,         // lr / (1 - beta1^t)
    bias_correction2_sqrt: f32, // sqrt(1 - beta2^t)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Optim;
@group(0) @binding(1) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> state_a: array<vec4<f32>>; // momentum buffer / exp_avg
@group(0) @binding(4) var<storage, read_write> state_b: array<vec4<f32>>; // exp_avg_sq
@group(0) @binding(5) var<storage, read_write> adam_step: AdamStep;

// g = grad + weight_decay * w; w -= lr * g
@compute @workgroup_size(WG)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        let g = grad[i] + p.weight_decay * param[i];
        param[i] -= p.lr * g;
    }
}

// buf = momentum * buf + g; w -= lr * buf. The buffer starts at zero, so
// the first step sets it to g, as torch does.
@compute @workgroup_size(WG)
fn sgd_momentum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        let g = grad[i] + p.weight_decay * param[i];
        let buf = p.momentum * state_a[i] + g;
        state_a[i] = buf;
        param[i] -= p.lr * buf;
    }
}

// One invocation, before the update: t += 1 and the bias corrections for t.
@compute @workgroup_size(1)
fn adam_count() {
    let t = adam_step.count + 1u;
    adam_step.count = t;
    adam_step.step_size = p.lr / (1.0 - pow(p.momentum, f32(t)));
    adam_step.bias_correction2_sqrt = sqrt(1.0 - pow(p.beta2, f32(t)));
}

// m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2;
// w -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
@compute @workgroup_size(WG)
fn adam(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.len) {
        let g = grad[i] + p.weight_decay * param[i];
        let m = state_a[i] + p.one_minus_beta1 * (g - state_a[i]);
        let v = p.beta2 * state_b[i] + p.one_minus_beta2 * g * g;
        state_a[i] = m;
        state_b[i] = v;
        let denom = sqrt(v) / adam_step.bias_correction2_sqrt + p.eps;
        param[i] -= adam_step.step_size * (m / denom);
    }
}
