// How the kernels of gemm_blocked.wgsl whose lanes share their k (matmul,
// convolve, conv_rows; in conv_filter_gradient the lanes of one K split)
// take A's rows for up to eight consecutive k, a panel, on adapters with
// subgroups of at least eight lanes: lane l loads the tile's rows at k =
// k0 + l, and every lane takes the rows at k0 + j from lane j by a shuffle. All lanes of a workgroup need the same rows at
// the same k, so this is one load per lane per panel where rows_of_a is
// one per k. On CPU adapters a storage load runs one lane and one float at
// a time (lavapipe: a loop over the lanes with a bounds check per float;
// A's loads were about 40% of LeNet's second convolution's data gradient),
// and a shuffle is a few register moves (a broadcast where the compiler
// knows the lane).

// The tile's rows (ROW_QUADS vec4s) at this lane's k, and the lane's
// place among the K_LANES lanes of a filter gradient's column run, which
// walk different K splits (0 for the other kernels): the lanes at the same
// place share a split and a panel of 8 / K_LANES k.
struct APanel {
    slot: u32,
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
    q4: vec4<f32>,
    q5: vec4<f32>,
    q6: vec4<f32>,
    q7: vec4<f32>,
}

// This invocation's lane in its subgroup, counted over the active lanes:
// whole workgroups reach the kernels' loops, so these are all of them.
fn panel_lane(local_index: u32) -> u32 {
    return subgroupExclusiveAdd(1u);
}

// The panel of the tile starting at row 4 * quad0 from k = k0 on; lanes
// past the last k load the last k's rows, which no kernel uses.
fn a_panel(k0: u32, quad0: u32, lane: u32) -> APanel {
    let r = rows_of_a(min(k0 + lane / K_LANES, max(p.k, 1u) - 1u), quad0);
    return APanel(lane % K_LANES, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
}

// The tile's rows of A at k = k0 + j.
fn panel_rows(panel: APanel, j: u32) -> array<vec4<f32>, 8> {
    let source = j * K_LANES + panel.slot;
    var rows = array<vec4<f32>, 8>();
    rows[0] = subgroupShuffle(panel.q0, source);
    rows[1] = subgroupShuffle(panel.q1, source);
    if (ROW_QUADS > 2u) {
        rows[2] = subgroupShuffle(panel.q2, source);
        rows[3] = subgroupShuffle(panel.q3, source);
    }
    if (ROW_QUADS > 4u) {
        rows[4] = subgroupShuffle(panel.q4, source);
        rows[5] = subgroupShuffle(panel.q5, source);
    }
    if (ROW_QUADS > 6u) {
        rows[6] = subgroupShuffle(panel.q6, source);
        rows[7] = subgroupShuffle(panel.q7, source);
    }
    return rows;
}

// conv_filter_gradient_pointwise: the tile's rows of A at the four k of a
// pixel quad, from dy at a[at] on. The lanes of a K split share the loads:
// with K_LANES 1 lane l loads row quad l, with K_LANES 2 each of a split's
// four lanes loads two (m0, m1), and every lane takes each row quad from
// the lane that loaded it.
struct DyPanel {
    slot: u32,
    m0: mat4x4<f32>,
    m1: mat4x4<f32>,
}

fn dy_panel(at: u32, quad0: u32, lane: u32) -> DyPanel {
    let first = quad0 + (lane / K_LANES) * K_LANES;
    var d = DyPanel(lane % K_LANES, dy_row_quad(at, first), mat4x4<f32>());
    if (K_LANES == 2u) {
        d.m1 = dy_row_quad(at, first + 1u);
    }
    return d;
}

// Row quad r at the quad's k j.
fn dy_row(d: DyPanel, j: u32, r: u32) -> vec4<f32> {
    let source = (r / K_LANES) * K_LANES + d.slot;
    return subgroupShuffle(select(d.m0[j], d.m1[j], r % K_LANES == 1u), source);
}

// The tile's rows of A at the quad's k j.
fn dy_quad_rows(d: DyPanel, j: u32) -> array<vec4<f32>, 8> {
    var rows = array<vec4<f32>, 8>();
    rows[0] = dy_row(d, j, 0u);
    rows[1] = dy_row(d, j, 1u);
    if (ROW_QUADS > 2u) {
        rows[2] = dy_row(d, j, 2u);
        rows[3] = dy_row(d, j, 3u);
    }
    if (ROW_QUADS > 4u) {
        rows[4] = dy_row(d, j, 4u);
        rows[5] = dy_row(d, j, 5u);
    }
    if (ROW_QUADS > 6u) {
        rows[6] = dy_row(d, j, 6u);
        rows[7] = dy_row(d, j, 7u);
    }
    return rows;
}
