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
    addend_at: vec2<u32>, // backward_data with ADDEND: the addend's layout
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
// x, dy and out as vec4s, for the *_quads kernels and QUADS.
@group(0) @binding(17) var<storage, read> x_quads: array<vec4<f32>>;
@group(0) @binding(18) var<storage, read> dy_quads: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read_write> out_quads: array<vec4<f32>>;

// backward_data adds the gradient that reached x by another path as it
// stores (graph::fusion): the sum of the two is never a pass of its own.
override ADDEND: bool = false;
@group(0) @binding(20) var<storage, read> addend: array<f32>;
@group(0) @binding(21) var<storage, read> addend_quads: array<vec4<f32>>;

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

// The partial sums' terms: one value, or with QUADS four (positions,
// sample strides and offsets whole vec4s, which p then counts), as a vec4
// whose unused lanes are zero. CPU adapters access memory one lane at a
// time, a vec4 at about the cost of a float.
override QUADS: bool = false;

fn x_term(at: u32) -> vec4<f32> {
    if (QUADS) {
        return x_quads[at];
    }
    return vec4<f32>(x[at], 0.0, 0.0, 0.0);
}

fn dy_term(at: u32) -> vec4<f32> {
    if (QUADS) {
        return dy_quads[at];
    }
    return vec4<f32>(dy[at], 0.0, 0.0, 0.0);
}

fn total(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
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
    var sum = vec4<f32>(0.0);
    var w = walk(p.x_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        sum += x_term(w.at);
        w = step(w, p.x_at);
    }
    let count = select(1u, 4u, QUADS) * (range.y - range.x);
    let m = total(sum) / f32(max(count, 1u));
    let lanes = select(vec4<f32>(1.0, 0.0, 0.0, 0.0), vec4<f32>(1.0), QUADS);
    var m2 = vec4<f32>(0.0);
    w = walk(p.x_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        let d = (x_term(w.at) - m) * lanes;
        m2 += d * d;
        w = step(w, p.x_at);
    }
    partial[p.first_split * p.channels + id] = vec4<f32>(m, total(m2), f32(count), 0.0);
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
    var dxhat = vec4<f32>(0.0);
    var dsum = vec4<f32>(0.0);
    var wx = walk(p.x_at, c, range.x);
    var wdy = walk(p.dy_at, c, range.x);
    for (var q = range.x; q < range.y; q++) {
        let g = dy_term(wdy.at);
        dxhat += g * (x_term(wx.at) - m) * s;
        dsum += g;
        wx = step(wx, p.x_at);
        wdy = step(wdy, p.dy_at);
    }
    partial[p.first_split * p.channels + id] = vec4<f32>(total(dxhat), total(dsum), 0.0, 0.0);
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
    let dx = gamma[c] * s / count * (count * dy[flat(p.dy_at, i)] - dbeta_in[c] - xhat * dgamma_in[c]);
    if (ADDEND) {
        out[flat(p.out_at, i)] = dx + addend[flat(p.addend_at, i)];
    } else {
        out[flat(p.out_at, i)] = dx;
    }
}

// The per-element kernels four elements at a time, where planes and layouts
// are whole vec4s: an invocation takes a run of up to RUN vec4s of one
// (sample, channel) plane, so it loads the channel's parameters once and
// steps through the run without dividing (CPU adapters load and divide one
// lane at a time: one vec4 per invocation spent more on a quad's five
// divisions and channel loads than on its data). Grid: RUN-vec4 runs of
// every plane, planes in order. Each value is computed in the same order
// as the per-element kernels do: folding gamma into invstd changed outputs
// in the last bit, enough to flip ReLU inputs within rounding of zero
// ahead of ResNet's max pool and move its gradients past PyTorch's.
override RUN: u32 = 16u;

struct Run {
    channel: u32,
    // The first of the run's vec4s at each of x, dy, out and the addend's
    // layouts, as vec4s.
    x: u32,
    dy: u32,
    out: u32,
    addend: u32,
    len: u32,
}

fn runs_per_plane() -> u32 {
    return (p.spatial / 4u + RUN - 1u) / RUN;
}

// Invocation id's run (len 0 past the last plane).
fn run_of(id: u32) -> Run {
    let runs = runs_per_plane();
    let plane = quotient(id, runs);
    let first = (id - plane * runs) * RUN;
    let sample = quotient(plane, p.channels);
    let c = plane - sample * p.channels;
    let len = select(0u, min(RUN, p.spatial / 4u - first), plane < p.batch * p.channels);
    let at = c * p.spatial / 4u + first;
    let x = p.x_at.x / 4u + sample * (p.x_at.y / 4u) + at;
    let dy = p.dy_at.x / 4u + sample * (p.dy_at.y / 4u) + at;
    let out = p.out_at.x / 4u + sample * (p.out_at.y / 4u) + at;
    let addend = p.addend_at.x / 4u + sample * (p.addend_at.y / 4u) + at;
    return Run(c, x, dy, out, addend, len);
}

@compute @workgroup_size(WG)
fn normalize_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = run_of(linear_index(gid, nwg));
    let m = saved_mean[r.channel];
    let s = saved_invstd[r.channel];
    let g = gamma[r.channel];
    let b = beta[r.channel];
    for (var j = 0u; j < r.len; j++) {
        out_quads[r.out + j] = activate4((x_quads[r.x + j] - m) * s * g + b);
    }
}

@compute @workgroup_size(WG)
fn normalize_eval_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = run_of(linear_index(gid, nwg));
    let m = running_mean[r.channel];
    let deviation = sqrt(running_var[r.channel] + p.eps);
    let g = gamma[r.channel];
    let b = beta[r.channel];
    for (var j = 0u; j < r.len; j++) {
        out_quads[r.out + j] = activate4((x_quads[r.x + j] - m) / deviation * g + b);
    }
}

@compute @workgroup_size(WG)
fn backward_data_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = run_of(linear_index(gid, nwg));
    let count = f32(p.count);
    let m = saved_mean[r.channel];
    let s = saved_invstd[r.channel];
    let scale = gamma[r.channel] * s / count;
    let dbeta = dbeta_in[r.channel];
    let dgamma = dgamma_in[r.channel];
    for (var j = 0u; j < r.len; j++) {
        let xhat = (x_quads[r.x + j] - m) * s;
        let dx = scale * (count * dy_quads[r.dy + j] - dbeta - xhat * dgamma);
        if (ADDEND) {
            out_quads[r.out + j] = dx + addend_quads[r.addend + j];
        } else {
            out_quads[r.out + j] = dx;
        }
    }
}
