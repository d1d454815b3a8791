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
    return at.x + (i / sample) * at.y + i % sample;
}
