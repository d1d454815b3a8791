// Deterministic two-stage sums (no float atomics): a first pass writes one
// partial sum per (split, column), a second adds the splits in fixed order.

struct Reduce {
    batch: u32,
    channels: u32,
    spatial: u32, // elements per (sample, channel); 1 for (N, C) tensors
    splits: u32,
    chunk: u32, // (sample, position) pairs per split
    len: u32,   // sum_splits: values per split
    src_at: vec2<u32>, // channel_sums: graph::Layout of src
    first_split: u32,  // channel_sums: this batch chunk's first split
}

@group(0) @binding(0) var<uniform> p: Reduce;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

// partial[s * channels + c] = sum of src[n, c, i] over split s of the (n, i) pairs.
@compute @workgroup_size(WG)
fn channel_sums(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    if (id >= p.splits * p.channels) {
        return;
    }
    let split = id / p.channels;
    let c = id % p.channels;
    let terms = p.batch * p.spatial;
    let first = split * p.chunk;
    let last = min(first + p.chunk, terms);
    var sum = 0.0;
    for (var q = first; q < last; q++) {
        let n = q / p.spatial;
        sum += src[p.src_at.x + n * p.src_at.y + c * p.spatial + q % p.spatial];
    }
    partial[p.first_split * p.channels + id] = sum;
}

@group(0) @binding(3) var<storage, read_write> total: array<f32>;

// total[i] = sum over s of partial[s * len + i].
@compute @workgroup_size(WG)
fn sum_splits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        sum += partial[s * p.len + i];
    }
    total[i] = sum;
}
