// Deterministic two-stage sums (no float atomics): a first pass writes one
// partial sum per (split, column), a second adds the splits in fixed order.

struct Reduce {
    batch: u32,
    channels: u32,
    spatial: u32, // elements per (sample, channel); 1 for (N, C) tensors
    splits: u32,
    chunk: u32, // (sample, position) pairs per split
    len: u32,   // sum_splits: values summed
    // channel_sums: graph::Layout of src; sum_splits: where the values
    // start in a split of `partial`, and the length of a split.
    src_at: vec2<u32>,
    first_split: u32,  // channel_sums: this batch chunk's first split
}

@group(0) @binding(0) var<uniform> p: Reduce;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

// src as vec4s, for channel_sums_quads.
@group(0) @binding(4) var<storage, read> src_quads: array<vec4<f32>>;

// Where term q = (sample, position) of channel c lives: the loops over a
// split step through the terms without dividing (CPU adapters divide
// integers one lane at a time).
struct Walk {
    at: u32,
    position: u32,
}

fn walk(c: u32, q: u32) -> Walk {
    let sample = quotient(q, p.spatial);
    let position = q - sample * p.spatial;
    return Walk(p.src_at.x + sample * p.src_at.y + c * p.spatial + position, position);
}

fn step(w: Walk) -> Walk {
    if (w.position + 1u == p.spatial) {
        return Walk(w.at + 1u + p.src_at.y - p.spatial, 0u);
    }
    return Walk(w.at + 1u, w.position + 1u);
}

// The (split, channel) invocation `id` sums: its channel and its terms.
struct Split {
    channel: u32,
    first: u32,
    last: u32,
}

fn split_of(id: u32) -> Split {
    let split = quotient(id, p.channels);
    let first = split * p.chunk;
    return Split(id - split * p.channels, first, min(first + p.chunk, p.batch * p.spatial));
}

// partial[s * channels + c] = sum of src[n, c, i] over split s of the (n, i) pairs.
@compute @workgroup_size(WG)
fn channel_sums(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    if (id >= p.splits * p.channels) {
        return;
    }
    let s = split_of(id);
    var w = walk(s.channel, s.first);
    var sum = 0.0;
    for (var q = s.first; q < s.last; q++) {
        sum += src[w.at];
        w = step(w);
    }
    partial[p.first_split * p.channels + id] = sum;
}

// channel_sums where positions, sample stride and offset are whole vec4s:
// p counts them in vec4s, and each term is a vec4. CPU adapters access
// memory one lane at a time, a vec4 at about the cost of a float.
@compute @workgroup_size(WG)
fn channel_sums_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    if (id >= p.splits * p.channels) {
        return;
    }
    let s = split_of(id);
    var w = walk(s.channel, s.first);
    var sum = 0.0;
    for (var q = s.first; q < s.last; q++) {
        let v = src_quads[w.at];
        sum += (v.x + v.y) + (v.z + v.w);
        w = step(w);
    }
    partial[p.first_split * p.channels + id] = sum;
}

@group(0) @binding(3) var<storage, read_write> total: array<f32>;

// total[i] = sum over s of partial[src_at.x + s * src_at.y + i].
@compute @workgroup_size(WG)
fn sum_splits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        sum += partial[p.src_at.x + s * p.src_at.y + i];
    }
    total[i] = sum;
}

// partial and total as vec4s, for sum_splits_quads.
@group(0) @binding(5) var<storage, read> partial_quads: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> total_quads: array<vec4<f32>>;

// sum_splits for len a whole number of vec4s: four values per invocation,
// each summed in the same order. CPU adapters load and store one lane at a
// time, a vec4 at about the cost of a float.
@compute @workgroup_size(WG)
fn sum_splits_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.len / 4u) {
        return;
    }
    let first = p.src_at.x / 4u + i;
    var sum = vec4<f32>(0.0);
    for (var s = 0u; s < p.splits; s++) {
        sum += partial_quads[first + s * (p.src_at.y / 4u)];
    }
    total_quads[i] = sum;
}
