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

// conv_filter_gradient_pointwise: the tile's rows of A at the four k of a
// pixel quad, from dy at a[at] on; each lane loads them all.
struct DyPanel {
    m0: mat4x4<f32>, m1: mat4x4<f32>, m2: mat4x4<f32>, m3: mat4x4<f32>,
    m4: mat4x4<f32>, m5: mat4x4<f32>, m6: mat4x4<f32>, m7: mat4x4<f32>,
}

fn dy_panel(at: u32, quad0: u32, lane: u32) -> DyPanel {
    var d: DyPanel;
    d.m0 = dy_row_quad(at, quad0);
    d.m1 = dy_row_quad(at, quad0 + 1u);
    if (ROW_QUADS > 2u) {
        d.m2 = dy_row_quad(at, quad0 + 2u);
        d.m3 = dy_row_quad(at, quad0 + 3u);
    }
    if (ROW_QUADS > 4u) {
        d.m4 = dy_row_quad(at, quad0 + 4u);
        d.m5 = dy_row_quad(at, quad0 + 5u);
    }
    if (ROW_QUADS > 6u) {
        d.m6 = dy_row_quad(at, quad0 + 6u);
        d.m7 = dy_row_quad(at, quad0 + 7u);
    }
    return d;
}

// The tile's rows of A at the quad's k j.
fn dy_quad_rows(d: DyPanel, j: u32) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(d.m0[j], d.m1[j], d.m2[j], d.m3[j], d.m4[j], d.m5[j], d.m6[j], d.m7[j]);
}
