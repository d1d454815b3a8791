// How the kernels of gemm_blocked.wgsl whose lanes share their k (matmul,
// convolve, conv_rows; in conv_filter_gradient the lanes of one K split)
// take A's rows for up to eight consecutive k, a panel: here each lane
// loads every k's rows itself.
// gemm_blocked_a_subgroup.wgsl shares the loads across a subgroup.

struct APanel {
    k0: u32,
    quad0: u32,
}

// This invocation's lane in its panel: its local index (a_panel here
// ignores it).
fn panel_lane(local_index: u32) -> u32 {
    return local_index;
}

// The panel of the tile starting at row 4 * quad0 from k = k0 on.
fn a_panel(k0: u32, quad0: u32, lane: u32) -> APanel {
    return APanel(k0, quad0);
}

// The tile's rows of A at k = k0 + j.
fn panel_rows(panel: APanel, j: u32) -> array<vec4<f32>, 8> {
    return rows_of_a(panel.k0 + j, panel.quad0);
}
