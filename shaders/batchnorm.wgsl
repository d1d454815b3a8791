// Batch normalisation over the channel dimension of (N, C) or (N, C, H, W)
// tensors (nn.BatchNorm1d / nn.BatchNorm2d), PyTorch semantics:
//   training   y = (x - mean) / sqrt(var + eps) * gamma + beta, with the
//              batch mean and biased variance; running_mean and running_var
//              move by `momentum` towards the mean and the unbiased variance
//   evaluation the same with the running statistics
//   backward   dbeta = sum dy, dgamma = sum dy * xhat,
//              dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)
//
// Sums over batch and positions run in splits, each writing partial results
// that a per-channel pass combines in a fixed order: no float atomics. A
// batch too large to bind at once is read in chunks, each writing its own
// splits; the per-element kernels then see one chunk (`batch`) at a time.

struct Norm {
    batch: u32,
    channels: u32,
    spatial: u32, // H * W, or 1 for (N, C)
    splits: u32,
    chunk: u32,   // (sample, position) pairs per split
    eps: f32,
    momentum: f32,
    first_split: u32, // *_partial: this batch chunk's first split
    // graph::Layout of x, dy and out: (offset, sample stride)
    x_at: vec2<u32>,
    dy_at: vec2<u32>,
    out_at: vec2<u32>,
    count: u32, // (sample, position) pairs in the whole batch
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Norm;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> partial: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> mean: array<f32>;
@group(0) @binding(7) var<storage, read_write> invstd: array<f32>;
@group(0) @binding(8) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(9) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(10) var<storage, read_write> out: array<f32>;
@group(0) @binding(11) var<storage, read> saved_mean: array<f32>;
@group(0) @binding(12) var<storage, read> saved_invstd: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(14) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(15) var<storage, read> dgamma_in: array<f32>;
@group(0) @binding(16) var<storage, read> dbeta_in: array<f32>;
// x, dy and out as vec4s, for the *_quads kernels.
@group(0) @binding(17) var<storage, read> x_quads: array<vec4<f32>>;
@group(0) @binding(18) var<storage, read> dy_quads: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read_write> out_quads: array<vec4<f32>>;

// Where channel c's (sample, position) pairs from q on lie in a tensor laid
// out as `l`: the loops over a split step through them without dividing
// (CPU adapters divide integers one lane at a time).
struct Walk {
    at: u32,
    position: u32,
}

fn walk(l: vec2<u32>, c: u32, q: u32) -> Walk {
    let sample = quotient(q, p.spatial);
    let position = q - sample * p.spatial;
    return Walk(l.x + sample * l.y + c * p.spatial + position, position);
}

fn step(w: Walk, l: vec2<u32>) -> Walk {
    if (w.position + 1u == p.spatial) {
        return Walk(w.at + 1u + l.y - p.spatial, 0u);
    }
    return Walk(w.at + 1u, w.position + 1u);
}

// The channel of flat element i of an (N, C, ...) tensor.
fn channel_of(i: u32) -> u32 {
    let plane = quotient(i, p.spatial);
    return plane - quotient(plane, p.channels) * p.channels;
}

// Flat element i of a tensor laid out as `l`.
fn flat(l: vec2<u32>, i: u32) -> u32 {
    return strided(l, p.channels * p.spatial, i);
}

fn split_range(split: u32) -> vec2<u32> {
    let first = split * p.chunk;
    return vec2<u32>(first, min(first + p.chunk, p.batch * p.spatial));
}

// partial[split, c] = (mean, M2, count) of channel c over the split: two passes, so
// the squares are of deviations from the split's own mean (stable).
@compute @workgroup_size(WG)
fn stats_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    if (id >= p.splits * p.channels) {
        return;
    }
    let c = id % p.channels;
    let range = split_range(id / p.channels);
    var sum = 0.0;
    var w = walk(p.x_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        sum += x[w.at];
        w = step(w, p.x_at);
    }
    let m = sum / f32(max(range.y - range.x, 1u));
    var m2 = 0.0;
    w = walk(p.x_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        let d = x[w.at] - m;
        m2 += d * d;
        w = step(w, p.x_at);
    }
    partial[p.first_split * p.channels + id] = vec4<f32>(m, m2, f32(range.y - range.x), 0.0);
}

// Per channel: merge the splits in order (Chan et al.), then the batch
// statistics and the running-statistics update.
@compute @workgroup_size(WG)
fn stats_finalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = linear_index(gid, nwg);
    if (c >= p.channels) {
        return;
    }
    var n = 0.0;
    var m = 0.0;
    var m2 = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let part = partial[s * p.channels + c];
        let nb = part.z;
        if (nb == 0.0) {
            continue;
        }
        let delta = part.x - m;
        let total = n + nb;
        m += delta * nb / total;
        m2 += part.y + delta * delta * n * nb / total;
        n = total;
    }
    mean[c] = m;
    invstd[c] = 1.0 / sqrt(m2 / n + p.eps);
    running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * m;
    running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * m2 / max(n - 1.0, 1.0);
}

@compute @workgroup_size(WG)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.batch * p.channels * p.spatial) {
        return;
    }
    let c = channel_of(i);
    out[flat(p.out_at, i)] = activate((x[flat(p.x_at, i)] - saved_mean[c]) * saved_invstd[c] * gamma[c] + beta[c]);
}

@compute @workgroup_size(WG)
fn normalize_eval(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.batch * p.channels * p.spatial) {
        return;
    }
    let c = channel_of(i);
    out[flat(p.out_at, i)] = activate((x[flat(p.x_at, i)] - running_mean[c]) / sqrt(running_var[c] + p.eps) * gamma[c] + beta[c]);
}

// partial[split, c] = (sum dy * xhat, sum dy) over the split.
@compute @workgroup_size(WG)
fn backward_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    if (id >= p.splits * p.channels) {
        return;
    }
    let c = id % p.channels;
    let range = split_range(id / p.channels);
    let m = saved_mean[c];
    let s = saved_invstd[c];
    var dxhat = 0.0;
    var dsum = 0.0;
    var wx = walk(p.x_at, c, range.x);
    var wdy = walk(p.dy_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        let g = dy[wdy.at];
        dxhat += g * (x[wx.at] - m) * s;
        dsum += g;
        wx = step(wx, p.x_at);
        wdy = step(wdy, p.dy_at);
    }
    partial[p.first_split * p.channels + id] = vec4<f32>(dxhat, dsum, 0.0, 0.0);
}

@compute @workgroup_size(WG)
fn backward_finalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = linear_index(gid, nwg);
    if (c >= p.channels) {
        return;
    }
    var total = vec2<f32>(0.0);
    for (var s = 0u; s < p.splits; s++) {
        total += partial[s * p.channels + c].xy;
    }
    dgamma[c] = total.x;
    dbeta[c] = total.y;
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.batch * p.channels * p.spatial) {
        return;
    }
    let c = channel_of(i);
    let count = f32(p.count);
    let s = saved_invstd[c];
    let xhat = (x[flat(p.x_at, i)] - saved_mean[c]) * s;
    out[flat(p.out_at, i)] = gamma[c] * s / count * (count * dy[flat(p.dy_at, i)] - dbeta_in[c] - xhat * dgamma_in[c]);
}

// The per-element kernels four elements at a time, where planes and layouts
// are whole vec4s (the four share a channel): one vec4 load and store for
// four elements; CPU adapters access memory one lane at a time.
fn quads_len() -> u32 {
    return p.batch * p.channels * p.spatial / 4u;
}

@compute @workgroup_size(WG)
fn normalize_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= quads_len()) {
        return;
    }
    let c = channel_of(4u * i);
    let v = x_quads[flat(p.x_at, 4u * i) / 4u];
    out_quads[flat(p.out_at, 4u * i) / 4u] = activate4((v - saved_mean[c]) * saved_invstd[c] * gamma[c] + beta[c]);
}

@compute @workgroup_size(WG)
fn normalize_eval_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= quads_len()) {
        return;
    }
    let c = channel_of(4u * i);
    let v = x_quads[flat(p.x_at, 4u * i) / 4u];
    out_quads[flat(p.out_at, 4u * i) / 4u] = activate4((v - running_mean[c]) / sqrt(running_var[c] + p.eps) * gamma[c] + beta[c]);
}

@compute @workgroup_size(WG)
fn backward_data_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= quads_len()) {
        return;
    }
    let c = channel_of(4u * i);
    let count = f32(p.count);
    let s = saved_invstd[c];
    let xhat = (x_quads[flat(p.x_at, 4u * i) / 4u] - saved_mean[c]) * s;
    let g = dy_quads[flat(p.dy_at, 4u * i) / 4u];
    out_quads[flat(p.out_at, 4u * i) / 4u] = gamma[c] * s / count * (count * g - dbeta_in[c] - xhat * dgamma_in[c]);
}
