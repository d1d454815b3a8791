// Register-tiled kernels for CPU adapters: C[M, N] = A[M, K] * B[K, N] with a
// 32 x 16 tile of C per invocation (8, 16 or 24 rows for smaller M). lavapipe
// runs a workgroup as 8-wide SIMD: the rows of a tile are the same for the
// whole workgroup, so A's vec4 loads are broadcasts, and each invocation
// takes its own 16 columns of B as four vec4s. Per k that is 12 loads for
// 512 multiply-adds.
//
// A always comes k-major: packed by `pack_k_major` (below), rows padded to
// the tile with zeros, or for `matmul` a matrix already stored k-major with
// whole vec4s per row. B is either k-major the same way (`matmul`) or
// gathered on the fly from an NCHW tensor: the implicit-GEMM convolutions
// `conv_forward`, `conv_transposed` (data gradient) and
// `conv_filter_gradient`; no im2col matrix is ever materialised. Stride-1
// convolutions with few channels have row kernels instead (`conv_rows`,
// `conv_rows_filter_gradient`, on rows copied by `pad_rows`): 16
// neighbouring pixels of one output row per invocation, every tap of a
// kernel row shifted out of the same 20 floats.
//
// Where every lane of a workgroup walks the same k (matmul, convolve,
// conv_rows; in conv_filter_gradient the lanes of one K split), A's rows
// come in panels of up to eight k through a_panel and panel_rows:
// gemm_blocked_a.wgsl loads them lane by lane as rows_of_a does,
// gemm_blocked_a_subgroup.wgsl (adapters with subgroups) has each lane load
// one k's rows for the whole subgroup.
//
// Every accumulator is a named struct member: lavapipe keeps arrays indexed
// in a loop in memory (measured 2.5 GFLOP/s against 19-33 unrolled at 1024^3).

struct Blocked {
    m: u32,
    n: u32,
    k: u32,
    // vec4s per packed row of A (padded M / 4) and of B (padded N / 4).
    a_quads: u32,
    b_quads: u32,
    // Columns per sample of C: col = sample * out_plane + pixel.
    out_plane: u32,
    // Convolutions: the gathered tensor x is [*, *, x_h, x_w]; output
    // pixels (columns) are out_w wide; a tap (ky, kx) of output pixel
    // (oy, ox) reads x at (oy * stride - pad + ky, ox * stride - pad + kx).
    x_h: u32,
    x_w: u32,
    kh: u32,
    kw: u32,
    out_w: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: i32,
    pad_w: i32,
    // conv_filter_gradient: output pixels per sample, terms per split (K is
    // split along workgroup_id.z) and this batch chunk's first split.
    pixels: u32,
    k_split: u32,
    first_split: u32,
    // C's element (row, sample * out_plane + pixel) lives at out_at.x +
    // sample * out_at.y + row * dst_plane + dst_first + (pixel / dst_w) *
    // dst_row + (pixel % dst_w) * dst_step: a row-major matrix or an NCHW
    // tensor (rows = channels), or for one phase of a strided data gradient
    // every stride-th pixel of it.
    dst_plane: u32,
    dst_w: u32,
    dst_row: u32,
    dst_step: u32,
    dst_first: u32,
    // conv_rows: 16-pixel segments per output row.
    row_segments: u32,
    // graph::Layout (offset, sample stride) of the output and of x.
    out_at: vec2<u32>,
    x_at: vec2<u32>,
    // conv_rows_filter_gradient: graph::Layout of dy.
    dy_at: vec2<u32>,
    // ACTIVATION_BACKWARD: graph::Layout of act_out.
    act_at: vec2<u32>,
}

// Rows per tile in vec4s: 8 (32 rows), 6 for 33 to 48 rows (two tiles),
// or 4 or 2 where the matrix has fewer rows (LeNet's 6 and 16 channels)
// and full tiles would be padding.
override ROW_QUADS: u32 = 8u;

// conv_filter_gradient: lanes of a workgroup that share the same columns and
// sum different pieces of K. A filter with few taps (LeNet's 25, a 7x7 stem's
// 49) has too few 16-column tiles to keep the workgroup's lanes busy.
override K_LANES: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Blocked;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(7) var<storage, read> x: array<f32>;

// Four rows (a's lanes) times four columns (b's lanes): row i is column i.
fn outer(a: vec4<f32>, b: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(b * a.x, b * a.y, b * a.z, b * a.w);
}

// One invocation's 32 x 16 accumulators (4 ROW_QUADS x 16 in use): block
// tRC holds rows 4R..4R+3 and columns 4C..4C+3, each matrix column one row
// of the tile.
struct Tile {
    t00: mat4x4<f32>, t01: mat4x4<f32>, t02: mat4x4<f32>, t03: mat4x4<f32>,
    t10: mat4x4<f32>, t11: mat4x4<f32>, t12: mat4x4<f32>, t13: mat4x4<f32>,
    t20: mat4x4<f32>, t21: mat4x4<f32>, t22: mat4x4<f32>, t23: mat4x4<f32>,
    t30: mat4x4<f32>, t31: mat4x4<f32>, t32: mat4x4<f32>, t33: mat4x4<f32>,
    t40: mat4x4<f32>, t41: mat4x4<f32>, t42: mat4x4<f32>, t43: mat4x4<f32>,
    t50: mat4x4<f32>, t51: mat4x4<f32>, t52: mat4x4<f32>, t53: mat4x4<f32>,
    t60: mat4x4<f32>, t61: mat4x4<f32>, t62: mat4x4<f32>, t63: mat4x4<f32>,
    t70: mat4x4<f32>, t71: mat4x4<f32>, t72: mat4x4<f32>, t73: mat4x4<f32>,
}

// t += a b for one k: a is the tile's rows of A, b its 16 columns of B.
fn accumulate(t: ptr<function, Tile>, a: array<vec4<f32>, 8>, b: array<vec4<f32>, 4>) {
    (*t).t00 += outer(a[0], b[0]); (*t).t01 += outer(a[0], b[1]); (*t).t02 += outer(a[0], b[2]); (*t).t03 += outer(a[0], b[3]);
    (*t).t10 += outer(a[1], b[0]); (*t).t11 += outer(a[1], b[1]); (*t).t12 += outer(a[1], b[2]); (*t).t13 += outer(a[1], b[3]);
    if (ROW_QUADS > 2u) {
        (*t).t20 += outer(a[2], b[0]); (*t).t21 += outer(a[2], b[1]); (*t).t22 += outer(a[2], b[2]); (*t).t23 += outer(a[2], b[3]);
        (*t).t30 += outer(a[3], b[0]); (*t).t31 += outer(a[3], b[1]); (*t).t32 += outer(a[3], b[2]); (*t).t33 += outer(a[3], b[3]);
    }
    if (ROW_QUADS > 4u) {
        (*t).t40 += outer(a[4], b[0]); (*t).t41 += outer(a[4], b[1]); (*t).t42 += outer(a[4], b[2]); (*t).t43 += outer(a[4], b[3]);
        (*t).t50 += outer(a[5], b[0]); (*t).t51 += outer(a[5], b[1]); (*t).t52 += outer(a[5], b[2]); (*t).t53 += outer(a[5], b[3]);
    }
    if (ROW_QUADS > 6u) {
        (*t).t60 += outer(a[6], b[0]); (*t).t61 += outer(a[6], b[1]); (*t).t62 += outer(a[6], b[2]); (*t).t63 += outer(a[6], b[3]);
        (*t).t70 += outer(a[7], b[0]); (*t).t71 += outer(a[7], b[1]); (*t).t72 += outer(a[7], b[2]); (*t).t73 += outer(a[7], b[3]);
    }
}

// The ROW_QUADS vec4s of A at k = kk for the tile starting at row
// 4 * quad0 (the rest of the array stays zero). A row of A shorter than the
// tile (a matrix bound as it is stored, not padded) repeats its last vec4:
// the rows past M are computed but never stored.
fn rows_of_a(kk: u32, quad0: u32) -> array<vec4<f32>, 8> {
    let first = kk * p.a_quads;
    let last = p.a_quads - 1u;
    var rows = array<vec4<f32>, 8>();
    rows[0] = a[first + min(quad0, last)];
    rows[1] = a[first + min(quad0 + 1u, last)];
    if (ROW_QUADS > 2u) {
        rows[2] = a[first + min(quad0 + 2u, last)];
        rows[3] = a[first + min(quad0 + 3u, last)];
    }
    if (ROW_QUADS > 4u) {
        rows[4] = a[first + min(quad0 + 4u, last)];
        rows[5] = a[first + min(quad0 + 5u, last)];
    }
    if (ROW_QUADS > 6u) {
        rows[6] = a[first + min(quad0 + 6u, last)];
        rows[7] = a[first + min(quad0 + 7u, last)];
    }
    return rows;
}

// Which way the grid walks the tiles. CPU adapters run workgroups in grid
// order, x fastest. With ROWS_FIRST the row tiles are x, so the row tiles
// over the same columns run back to back and read B (gathered x) while it
// is still cached, all of A staying cached when it is small; otherwise the
// column groups are x (folded into z past the grid limit) and each row
// tile keeps its rows of A cached while B streams past. matmul,
// conv_forward and conv_transposed only.
override ROWS_FIRST: bool = false;

// The tile's first row in vec4s.
fn row_quad0(wid: vec3<u32>) -> u32 {
    return select(wid.y, wid.x, ROWS_FIRST) * ROW_QUADS;
}

// The first of the 16 columns lane `lane` computes, in vec4s.
fn first_quad(wid: vec3<u32>, nwg: vec3<u32>, lane: u32) -> u32 {
    let group = select(lane_group(wid, nwg), wid.y + wid.z * nwg.y, ROWS_FIRST);
    return (group * WG + lane) * 4u;
}

// Whether a whole workgroup lies past the last column (a folded grid's
// rounding). Lanes past the end inside a workgroup run on, reading zero
// columns and storing nothing: A's panels need every lane.
fn past_the_end(wid: vec3<u32>, nwg: vec3<u32>) -> bool {
    return first_quad(wid, nwg, 0u) >= p.b_quads;
}

// Where columns col0..col0+3 of row 0 of C live, relative to `at`;
// NO_COLUMN past the end. Computed once per 4 columns: the divisions run one
// lane at a time on CPU adapters and would otherwise cost more than a short
// k loop.
const NO_COLUMN = 0xffffffffu;

fn column_offsets(col0: u32) -> vec4<u32> {
    let col = vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u);
    let pixel = col % p.out_plane;
    let at = (col / p.out_plane) * p.out_at.y + p.dst_first + (pixel / p.dst_w) * p.dst_row + (pixel % p.dst_w) * p.dst_step;
    return select(at, vec4<u32>(NO_COLUMN), col >= vec4<u32>(p.n));
}

// Whether every four columns from a multiple of four on are four
// consecutive floats of C starting on a vec4 (or all four past the end):
// a tile row's quad is then one vec4 store, where CPU adapters store floats
// one lane at a time (LeNet's first convolution spent a third of its time
// storing its output).
override QUAD_STORES: bool = false;

// C as vec4s, for QUAD_STORES: the same memory as c.
@group(0) @binding(13) var<storage, read_write> c_quads: array<vec4<f32>>;

// Rows of a tile that can hold rows of C: M where the whole matrix is one
// tile of rows, else all of them. The compiler drops the sums of the rest
// (LeNet's 6 channels in an 8-row tile: a quarter of the multiply-adds).
override LIVE_ROWS: u32 = 32u;

// A data gradient followed by the backward of the activation before the
// convolution (graph::fusion) carries each result on through it as it
// stores: ACTIVATION's backward, from the activation's output act_out (the
// convolution's input) at the same element, so the gradient between the
// two is never written. Where this is false, stores apply ACTIVATION.
override ACTIVATION_BACKWARD: bool = false;

@group(0) @binding(15) var<storage, read> act_out: array<f32>;
@group(0) @binding(16) var<storage, read> act_out_quads: array<vec4<f32>>;

// Where element i of C (an NCHW tensor at out_at) lies in act_out (the same
// shape at act_at): the same element of the same sample, a fixed distance
// away where the sample strides are the same (everywhere but channel
// slices of concatenations).
fn act_index(i: u32) -> u32 {
    if (p.act_at.y == p.out_at.y) {
        return i - p.out_at.x + p.act_at.x;
    }
    let sample = quotient(i - p.out_at.x, p.out_at.y);
    return i - p.out_at.x - sample * p.out_at.y + p.act_at.x + sample * p.act_at.y;
}

// Result v as element i of C stores it.
fn finish(v: f32, i: u32) -> f32 {
    if (ACTIVATION_BACKWARD) {
        return activation_backward(ACTIVATION, act_out[act_index(i)], v);
    }
    return activate(v);
}

// The data gradient of a 1x1 convolution with stride 2 and no padding
// (ResNet's shortcuts) reaches only dx's even rows and columns. Where dx is
// twice dy in both axes, dy's rows an even width and dx's rows whole vec4s,
// the one tapped phase stores the other three's zeros beside its results:
// each two columns of a tile row (dx columns 2j and 2j + 2 of an even row)
// as one vec4 with a zero after each, and the odd row below them as a vec4
// of zeros. dx is written once, where a pass of zeros first wrote it all
// and the phase then stored a float at a time.
override ZERO_PHASES: bool = false;

// Results v as elements i..i+3 of C store them (QUAD_STORES; act_out's
// planes are C's, so its offsets are whole vec4s where C's are).
fn finish4(v: vec4<f32>, i: u32) -> vec4<f32> {
    if (ACTIVATION_BACKWARD) {
        return activation_backward4(act_out_quads[act_index(i) / 4u], v);
    }
    return activate4(v);
}

// Stores block t, rows tile_row..tile_row + 3 of the tile whose first row
// is r.
fn store(t: mat4x4<f32>, at: u32, r: u32, tile_row: u32, columns: vec4<u32>) {
    for (var i = 0u; i < 4u; i++) {
        let row = r + tile_row + i;
        let live = tile_row + i < LIVE_ROWS && row < p.m;
        if (QUAD_STORES) {
            if (live && columns[0] != NO_COLUMN) {
                let e = at + row * p.dst_plane + columns[0];
                c_quads[e / 4u] = finish4(t[i], e);
            }
        } else if (ZERO_PHASES) {
            for (var j = 0u; j < 4u; j += 2u) {
                if (live && columns[j] != NO_COLUMN) {
                    let e = at + row * p.dst_plane + columns[j];
                    c_quads[e / 4u] = finish4(vec4<f32>(t[i][j], 0.0, t[i][j + 1u], 0.0), e);
                    c_quads[(e + p.dst_row / 2u) / 4u] = vec4<f32>(0.0);
                }
            }
        } else {
            // Each value is finished outside the branch: a load of act_out
            // under it ran lane by lane, doubling DenseNet's data gradients
            // into 3 x 3 planes (17 -> 34-38 ms; 19 ms so). Past the end,
            // e points anywhere, the read is clamped and nothing is stored.
            for (var j = 0u; j < 4u; j++) {
                let e = at + row * p.dst_plane + columns[j];
                let v = finish(t[i][j], e);
                if (live && columns[j] != NO_COLUMN) {
                    c[e] = v;
                }
            }
        }
    }
}

// Where the 16 columns from 4 * quad0 on live (see column_offsets).
fn tile_columns(quad0: u32) -> array<vec4<u32>, 4> {
    let col0 = quad0 * 4u;
    return array<vec4<u32>, 4>(column_offsets(col0), column_offsets(col0 + 4u), column_offsets(col0 + 8u), column_offsets(col0 + 12u));
}

// Writes the tile whose first row is 4 * row_quad0 to C starting at element
// `at`, its columns at the given offsets from `at`.
fn store_tile(t: Tile, at: u32, row_quad0: u32, columns: array<vec4<u32>, 4>) {
    let r = row_quad0 * 4u;
    let c0 = columns[0];
    let c1 = columns[1];
    let c2 = columns[2];
    let c3 = columns[3];
    store(t.t00, at, r, 0u, c0); store(t.t01, at, r, 0u, c1); store(t.t02, at, r, 0u, c2); store(t.t03, at, r, 0u, c3);
    store(t.t10, at, r, 4u, c0); store(t.t11, at, r, 4u, c1); store(t.t12, at, r, 4u, c2); store(t.t13, at, r, 4u, c3);
    if (ROW_QUADS > 2u) {
        store(t.t20, at, r, 8u, c0); store(t.t21, at, r, 8u, c1); store(t.t22, at, r, 8u, c2); store(t.t23, at, r, 8u, c3);
        store(t.t30, at, r, 12u, c0); store(t.t31, at, r, 12u, c1); store(t.t32, at, r, 12u, c2); store(t.t33, at, r, 12u, c3);
    }
    if (ROW_QUADS > 4u) {
        store(t.t40, at, r, 16u, c0); store(t.t41, at, r, 16u, c1); store(t.t42, at, r, 16u, c2); store(t.t43, at, r, 16u, c3);
        store(t.t50, at, r, 20u, c0); store(t.t51, at, r, 20u, c1); store(t.t52, at, r, 20u, c2); store(t.t53, at, r, 20u, c3);
    }
    if (ROW_QUADS > 6u) {
        store(t.t60, at, r, 24u, c0); store(t.t61, at, r, 24u, c1); store(t.t62, at, r, 24u, c2); store(t.t63, at, r, 24u, c3);
        store(t.t70, at, r, 28u, c0); store(t.t71, at, r, 28u, c1); store(t.t72, at, r, 28u, c2); store(t.t73, at, r, 28u, c3);
    }
}

// Four bias values from i on, clamped to the last.
fn bias_quad(i: u32, len: u32) -> vec4<f32> {
    let last = len - 1u;
    return vec4<f32>(bias[min(i, last)], bias[min(i + 1u, last)], bias[min(i + 2u, last)], bias[min(i + 3u, last)]);
}

const ONES = vec4<f32>(1.0);

// t += bias as an outer product with ones: per column (Linear: bias[n]) or
// per row (conv: bias[c_out]). Added after the sum, as PyTorch does, so that
// equal outputs stay equal and max-pool ties break the same way.
fn add_column_bias(t: ptr<function, Tile>, quad0: u32) {
    let q = quad0 * 4u;
    accumulate(t, array<vec4<f32>, 8>(ONES, ONES, ONES, ONES, ONES, ONES, ONES, ONES),
        array<vec4<f32>, 4>(bias_quad(q, p.n), bias_quad(q + 4u, p.n), bias_quad(q + 8u, p.n), bias_quad(q + 12u, p.n)));
}

fn add_row_bias(t: ptr<function, Tile>, row_quad0: u32) {
    let r = row_quad0 * 4u;
    accumulate(t, array<vec4<f32>, 8>(bias_quad(r, p.m), bias_quad(r + 4u, p.m), bias_quad(r + 8u, p.m), bias_quad(r + 12u, p.m),
        bias_quad(r + 16u, p.m), bias_quad(r + 20u, p.m), bias_quad(r + 24u, p.m), bias_quad(r + 28u, p.m)),
        array<vec4<f32>, 4>(ONES, ONES, ONES, ONES));
}

fn multiply(row_quad0: u32, quad0: u32, lane: u32) -> Tile {
    var t: Tile;
    // As in rows_of_a: a row of B shorter than the tile repeats its last vec4.
    let last = p.b_quads - 1u;
    let q = vec4<u32>(min(quad0, last), min(quad0 + 1u, last), min(quad0 + 2u, last), min(quad0 + 3u, last));
    var a_k: APanel;
    for (var kk = 0u; kk < p.k; kk++) {
        let at = vec4<u32>(kk * p.b_quads) + q;
        if ((kk & 7u) == 0u) {
            a_k = a_panel(kk, row_quad0, lane);
        }
        accumulate(&t, panel_rows(a_k, kk & 7u), array<vec4<f32>, 4>(b[at.x], b[at.y], b[at.z], b[at.w]));
    }
    return t;
}

@compute @workgroup_size(WG)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (past_the_end(wid, nwg)) {
        return;
    }
    let quad0 = first_quad(wid, nwg, lane);
    store_tile(multiply(row_quad0(wid), quad0, panel_lane(lane)), p.out_at.x, row_quad0(wid), tile_columns(quad0));
}

@compute @workgroup_size(WG)
fn matmul_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (past_the_end(wid, nwg)) {
        return;
    }
    let quad0 = first_quad(wid, nwg, lane);
    var t = multiply(row_quad0(wid), quad0, panel_lane(lane));
    add_column_bias(&t, quad0);
    store_tile(t, p.out_at.x, row_quad0(wid), tile_columns(quad0));
}

// Where four output pixels (columns) read their input: the top-left tap's
// row and column (negative in the padding) and its element of x (the
// sample's first element plus its offset in the plane), to which each tap
// adds one offset for all four: one vector add per tap where rows times
// x_w plus columns were three and an integer multiply (the 7x7 stem at
// batch 64 on lavapipe: 40.1-41.9 -> 38.9-40.1 ms).
struct Window {
    y0: vec4<i32>,
    x0: vec4<i32>,
    origin: vec4<i32>,
}

fn window(col0: u32) -> Window {
    let col = vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u);
    let plane = p.out_plane;
    let pixel = col % plane;
    let oy = pixel / p.out_w;
    let ox = pixel % p.out_w;
    // Columns past the end read nothing: a row far above any tap.
    let outside = col >= vec4<u32>(p.n);
    let y0 = select(vec4<i32>(oy * p.stride_h) - p.pad_h, vec4<i32>(-1000000), outside);
    let x0 = vec4<i32>(ox * p.stride_w) - p.pad_w;
    let base = vec4<i32>(p.x_at.x + (col / plane) * p.x_at.y);
    return Window(y0, x0, base + y0 * i32(p.x_w) + x0);
}

// Whether the convolution is pointwise (1x1, stride 1, no padding) on
// planes of whole vec4s: four columns from a multiple of four on are then
// four consecutive floats of x, one vec4 load where a gather takes four
// (LeNet-sized kernels gather; GoogLeNet's and DenseNet's 1x1 layers do not
// need to).
override POINTWISE: bool = false;

// x as vec4s, for POINTWISE: the same memory as x.
@group(0) @binding(14) var<storage, read> x_quads: array<vec4<f32>>;

// x at tap (ky, kx) of an input channel for four pixels, `tap_at` (the
// channel's plane offset + ky x_w + kx) from their origins; zero in the
// padding.
fn gather(win: Window, tap_at: i32, ky: i32, kx: i32) -> vec4<f32> {
    if (POINTWISE) {
        let inside = win.y0.x >= 0;
        return select(vec4<f32>(0.0), x_quads[select(0, win.origin.x + tap_at, inside) / 4], inside);
    }
    let iy = win.y0 + ky;
    let ix = win.x0 + kx;
    let inside = (vec4<u32>(iy) < vec4<u32>(p.x_h)) & (vec4<u32>(ix) < vec4<u32>(p.x_w));
    let at = vec4<u32>(select(vec4<i32>(0), win.origin + tap_at, inside));
    return select(vec4<f32>(0.0), vec4<f32>(x[at.x], x[at.y], x[at.z], x[at.w]), inside);
}

// C = A im2col(x) on the tile of rows 4 row_quad0.. and columns 4 quad0..;
// taps in PyTorch's (channel, ky, kx) order.
fn convolve(row_quad0: u32, quad0: u32, lane: u32) -> Tile {
    let w0 = window(quad0 * 4u);
    let w1 = window(quad0 * 4u + 4u);
    let w2 = window(quad0 * 4u + 8u);
    let w3 = window(quad0 * 4u + 12u);
    var t: Tile;
    var plane_at = 0i;
    var ky = 0i;
    var kx = 0i;
    var a_k: APanel;
    for (var kk = 0u; kk < p.k; kk++) {
        let tap_at = plane_at + ky * i32(p.x_w) + kx;
        let cols = array<vec4<f32>, 4>(
            gather(w0, tap_at, ky, kx),
            gather(w1, tap_at, ky, kx),
            gather(w2, tap_at, ky, kx),
            gather(w3, tap_at, ky, kx),
        );
        if ((kk & 7u) == 0u) {
            a_k = a_panel(kk, row_quad0, lane);
        }
        accumulate(&t, panel_rows(a_k, kk & 7u), cols);
        kx++;
        if (kx == i32(p.kw)) {
            kx = 0i;
            ky++;
            if (ky == i32(p.kh)) {
                ky = 0i;
                plane_at += i32(p.x_h * p.x_w);
            }
        }
    }
    return t;
}

// y = conv2d(x, w) + bias: C[c_out, batch * ho * wo] = W[c_out, c_in*kh*kw]
// times the implicit im2col matrix of x.
@compute @workgroup_size(WG)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (past_the_end(wid, nwg)) {
        return;
    }
    let quad0 = first_quad(wid, nwg, lane);
    var t = convolve(row_quad0(wid), quad0, panel_lane(lane));
    add_row_bias(&t, row_quad0(wid));
    store_tile(t, p.out_at.x, row_quad0(wid), tile_columns(quad0));
}

// The data gradient of a convolution is a sum of stride-1 ones, one per
// phase (iy mod stride, ix mod stride) of dx: each phase's pixels take the
// taps of the kernel that land on them, flipped, from dy. x is dy here, A
// the phase's kernel taps packed [c_in][(c_out, ty, tx)], and the stores
// scatter to every stride-th pixel of dx (dst_*).
@compute @workgroup_size(WG)
fn conv_transposed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (past_the_end(wid, nwg)) {
        return;
    }
    let quad0 = first_quad(wid, nwg, lane);
    store_tile(convolve(row_quad0(wid), quad0, panel_lane(lane)), p.out_at.x, row_quad0(wid), tile_columns(quad0));
}

// Stride-1 convolutions of an input whose rows were copied zero-padded and
// vec4-aligned (`pad_rows`). An invocation's 16 columns are 16 neighbouring
// output pixels of one row, so for each input channel and kernel row it
// loads the 20 floats under them as five vec4s and takes every tap of that
// row by shifting lanes: 5 loads for kw taps, where `convolve` gathers 16
// floats one at a time per tap. The grid's z is the output row: a
// workgroup skips the kernel rows that fall outside the input, which a
// data gradient's full padding makes a third of them. A kernel row's taps
// are consecutive k, so A's rows for them come as one panel: a_panel and
// panel_rows, from gemm_blocked_a.wgsl or, on adapters with subgroups,
// gemm_blocked_a_subgroup.wgsl, which loads a panel once for all lanes.
@group(0) @binding(10) var<storage, read> x_rows: array<vec4<f32>>;

// Taps per kernel row (at most 5; conv_rows_filter_gradient too): a
// constant, so that each tap's shift is a fixed swizzle and its A rows a
// fixed lane of the panel.
override KW: u32 = 5u;

// 20 floats of a padded input row.
struct RowSegment {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
    q4: vec4<f32>,
}

// The four floats `shift` (0 to 4) into a followed by b. Selects, not
// branches: a branch between two accumulations makes the compiler store
// and reload the whole tile around it.
fn shift4(a: vec4<f32>, b: vec4<f32>, shift: u32) -> vec4<f32> {
    var v = select(a, vec4<f32>(a.yzw, b.x), shift == 1u);
    v = select(v, vec4<f32>(a.zw, b.xy), shift == 2u);
    v = select(v, vec4<f32>(a.w, b.xyz), shift == 3u);
    return select(v, b, shift == 4u);
}

// The 16 floats `shift` into `s`.
fn shifted(s: RowSegment, shift: u32) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(shift4(s.q0, s.q1, shift), shift4(s.q1, s.q2, shift),
        shift4(s.q2, s.q3, shift), shift4(s.q3, s.q4, shift));
}

// C = A im2col(x) for 16 pixels of output row oy, from x's rows padded to
// x_w floats; kernels up to 5 taps wide.
fn convolve_rows(row_quad0: u32, sample: u32, segment: u32, oy: u32, lane: u32) -> Tile {
    let taps = p.kh * p.kw;
    let channels = p.k / taps;
    let top = i32(oy) - p.pad_h;
    let first_ky = u32(max(-top, 0));
    let last_ky = u32(clamp(i32(p.x_h) - top, 0, i32(p.kh)));
    let row0 = (p.x_at.x + sample * p.x_at.y + segment * 16u) / 4u;
    let row_quads = p.x_w / 4u;
    var t: Tile;
    for (var ci = 0u; ci < channels; ci++) {
        for (var ky = first_ky; ky < last_ky; ky++) {
            let at = row0 + (ci * p.x_h + u32(top + i32(ky))) * row_quads;
            let s = RowSegment(x_rows[at], x_rows[at + 1u], x_rows[at + 2u], x_rows[at + 3u], x_rows[at + 4u]);
            let a_k = a_panel(ci * taps + ky * KW, row_quad0, lane);
            accumulate(&t, panel_rows(a_k, 0u), shifted(s, 0u));
            if (KW > 1u) { accumulate(&t, panel_rows(a_k, 1u), shifted(s, 1u)); }
            if (KW > 2u) { accumulate(&t, panel_rows(a_k, 2u), shifted(s, 2u)); }
            if (KW > 3u) { accumulate(&t, panel_rows(a_k, 3u), shifted(s, 3u)); }
            if (KW > 4u) { accumulate(&t, panel_rows(a_k, 4u), shifted(s, 4u)); }
        }
    }
    return t;
}

// Where output pixels ox0.. of row oy live in C relative to the sample's
// first element; NO_COLUMN past the row's end or for a lane past the last
// segment.
fn row_columns(oy: u32, ox0: u32, inside: bool) -> array<vec4<u32>, 4> {
    var columns: array<vec4<u32>, 4>;
    for (var j = 0u; j < 4u; j++) {
        let ox = vec4<u32>(ox0 + 4u * j) + vec4<u32>(0u, 1u, 2u, 3u);
        columns[j] = select(vec4<u32>(NO_COLUMN), oy * p.out_w + ox, (ox < vec4<u32>(p.out_w)) & vec4<bool>(inside));
    }
    return columns;
}

// A lane's output: lanes along x are (sample, segment) pairs, clamped past
// the end (see `forward` in conv2d.wgsl for why there is no early return);
// `inside` is false for the clamped ones, which store nothing.
struct RowLane {
    sample: u32,
    segment: u32,
    inside: bool,
}

fn row_lane(wid: vec3<u32>, lane: u32) -> RowLane {
    let column = wid.x * WG + lane;
    let clamped = min(column, p.n - 1u);
    let sample = clamped / p.row_segments;
    return RowLane(sample, clamped - sample * p.row_segments, column < p.n);
}

fn store_rows(t: Tile, wid: vec3<u32>, l: RowLane) {
    let at = p.out_at.x + l.sample * p.out_at.y;
    store_tile(t, at, wid.y * ROW_QUADS, row_columns(wid.z, l.segment * 16u, l.inside));
}

@compute @workgroup_size(WG)
fn conv_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let l = row_lane(wid, lane);
    store_rows(convolve_rows(wid.y * ROW_QUADS, l.sample, l.segment, wid.z, panel_lane(lane)), wid, l);
}

@compute @workgroup_size(WG)
fn conv_rows_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let l = row_lane(wid, lane);
    var t = convolve_rows(wid.y * ROW_QUADS, l.sample, l.segment, wid.z, panel_lane(lane));
    add_row_bias(&t, wid.y * ROW_QUADS);
    store_rows(t, wid, l);
}

// conv_rows_filter_gradient: dweight of a stride-1 convolution with a
// kernel at most 5 x 5 into CHANNELS (at most 8) output channels, from x's
// padded rows (pad_rows) and dy's rows, whole vec4s. Each lane sums its own
// run of k_split terms (sample, output row, 16-pixel segment) for the
// KH x KW weights of one input channel into every output channel: per term
// it loads the KH rows of x under the segment once for all channels, and
// each channel's 16 dy values once for all taps. (With a lane per output
// channel each lane loaded the same rows of x; CPU adapters load one lane
// at a time, and LeNet's first filter gradient ran at 10 GFLOP/s.) Lane
// `split` = wid.x * WG + lane writes its partial sums to slice
// first_split + split of c; the grid's y is the input channel. KH, KW and
// CHANNELS are constants so that every sum is a named register (see
// `Tile`).
override KH: u32 = 5u;
override CHANNELS: u32 = 8u;

@group(0) @binding(12) var<storage, read> dy_rows: array<vec4<f32>>;

// The sums of one kernel row: kx = 0..3 and kx = 4.
struct TapRow {
    lo: vec4<f32>,
    hi: f32,
}

// 16 floats as four vec4s (no arrays: CPU adapters may keep those in memory).
struct Floats16 {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
}

// d dotted with the 16 floats `shift` into s.
fn dot_shifted(d: Floats16, s: RowSegment, shift: u32) -> f32 {
    return dot(d.q0, shift4(s.q0, s.q1, shift)) + dot(d.q1, shift4(s.q1, s.q2, shift))
        + dot(d.q2, shift4(s.q2, s.q3, shift)) + dot(d.q3, shift4(s.q3, s.q4, shift));
}

// dy's 16 values dotted with the x row under each of the KW taps.
fn tap_row(d: Floats16, s: RowSegment) -> TapRow {
    var r: TapRow;
    r.lo.x = dot_shifted(d, s, 0u);
    if (KW > 1u) { r.lo.y = dot_shifted(d, s, 1u); }
    if (KW > 2u) { r.lo.z = dot_shifted(d, s, 2u); }
    if (KW > 3u) { r.lo.w = dot_shifted(d, s, 3u); }
    if (KW > 4u) { r.hi = dot_shifted(d, s, 4u); }
    return r;
}

fn add_rows(a: TapRow, b: TapRow) -> TapRow {
    return TapRow(a.lo + b.lo, a.hi + b.hi);
}

// x's padded row iy of plane `plane_at` (vec4 index) from vec4 `column`
// on; zeros where iy is outside the input.
fn x_segment(plane_at: u32, iy: i32, column: u32) -> RowSegment {
    let inside = u32(iy) < p.x_h;
    let at = plane_at + u32(select(0, iy, inside)) * (p.x_w / 4u) + column;
    let zero = vec4<f32>(0.0);
    return RowSegment(select(zero, x_rows[at], inside), select(zero, x_rows[at + 1u], inside),
        select(zero, x_rows[at + 2u], inside), select(zero, x_rows[at + 3u], inside), select(zero, x_rows[at + 4u], inside));
}

// One output channel's sums, kernel row by kernel row.
struct FilterSums {
    r0: TapRow,
    r1: TapRow,
    r2: TapRow,
    r3: TapRow,
    r4: TapRow,
}

// The KH rows of x under a segment.
struct XRows {
    s0: RowSegment,
    s1: RowSegment,
    s2: RowSegment,
    s3: RowSegment,
    s4: RowSegment,
}

// sums += the products of one channel's dy values d with the rows under
// every tap.
fn add_term(sums: FilterSums, d: Floats16, x: XRows) -> FilterSums {
    var s = sums;
    s.r0 = add_rows(s.r0, tap_row(d, x.s0));
    if (KH > 1u) { s.r1 = add_rows(s.r1, tap_row(d, x.s1)); }
    if (KH > 2u) { s.r2 = add_rows(s.r2, tap_row(d, x.s2)); }
    if (KH > 3u) { s.r3 = add_rows(s.r3, tap_row(d, x.s3)); }
    if (KH > 4u) { s.r4 = add_rows(s.r4, tap_row(d, x.s4)); }
    return s;
}

// A lane's sums, output channel by output channel.
struct ChannelSums {
    c0: FilterSums,
    c1: FilterSums,
    c2: FilterSums,
    c3: FilterSums,
    c4: FilterSums,
    c5: FilterSums,
    c6: FilterSums,
    c7: FilterSums,
}

// The 16 dy values of a segment from vec4 `at` on, of which the first
// `live` vec4s lie in the row (the rest is zero).
fn dy_segment(at: u32, live: u32) -> Floats16 {
    let zero = vec4<f32>(0.0);
    return Floats16(dy_rows[at], select(zero, dy_rows[at + 1u], live > 1u),
        select(zero, dy_rows[at + 2u], live > 2u), select(zero, dy_rows[at + 3u], live > 3u));
}

fn store_tap_row(at: u32, r: TapRow) {
    c[at] = r.lo.x;
    if (KW > 1u) { c[at + 1u] = r.lo.y; }
    if (KW > 2u) { c[at + 2u] = r.lo.z; }
    if (KW > 3u) { c[at + 3u] = r.lo.w; }
    if (KW > 4u) { c[at + 4u] = r.hi; }
}

// One output channel's KH x KW sums from element `at` of c on.
fn store_filter(at: u32, s: FilterSums) {
    store_tap_row(at, s.r0);
    if (KH > 1u) { store_tap_row(at + KW, s.r1); }
    if (KH > 2u) { store_tap_row(at + 2u * KW, s.r2); }
    if (KH > 3u) { store_tap_row(at + 3u * KW, s.r3); }
    if (KH > 4u) { store_tap_row(at + 4u * KW, s.r4); }
}

@compute @workgroup_size(WG)
fn conv_rows_filter_gradient(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let ci = wid.y;
    let split = wid.x * WG + lane;
    let out_h = p.pixels / p.out_w;
    let per_sample = out_h * p.row_segments;
    let first = split * p.k_split;
    let last = min(first + p.k_split, p.k);
    var sample = first / per_sample;
    var oy = (first - sample * per_sample) / p.row_segments;
    var segment = first - sample * per_sample - oy * p.row_segments;
    let channel_quads = p.pixels / 4u;
    var sums: ChannelSums;
    for (var t = first; t < last; t++) {
        let plane_at = (p.x_at.x + sample * p.x_at.y) / 4u + ci * p.x_h * (p.x_w / 4u);
        let top = i32(oy) - p.pad_h;
        let column = segment * 4u;
        var x: XRows;
        x.s0 = x_segment(plane_at, top, column);
        if (KH > 1u) { x.s1 = x_segment(plane_at, top + 1, column); }
        if (KH > 2u) { x.s2 = x_segment(plane_at, top + 2, column); }
        if (KH > 3u) { x.s3 = x_segment(plane_at, top + 3, column); }
        if (KH > 4u) { x.s4 = x_segment(plane_at, top + 4, column); }
        // The row's quads from this segment on: the rest of the segment is zero.
        let live = (p.out_w - segment * 16u) / 4u;
        let d_at = (p.dy_at.x + sample * p.dy_at.y + oy * p.out_w) / 4u + segment * 4u;
        sums.c0 = add_term(sums.c0, dy_segment(d_at, live), x);
        if (CHANNELS > 1u) { sums.c1 = add_term(sums.c1, dy_segment(d_at + channel_quads, live), x); }
        if (CHANNELS > 2u) { sums.c2 = add_term(sums.c2, dy_segment(d_at + 2u * channel_quads, live), x); }
        if (CHANNELS > 3u) { sums.c3 = add_term(sums.c3, dy_segment(d_at + 3u * channel_quads, live), x); }
        if (CHANNELS > 4u) { sums.c4 = add_term(sums.c4, dy_segment(d_at + 4u * channel_quads, live), x); }
        if (CHANNELS > 5u) { sums.c5 = add_term(sums.c5, dy_segment(d_at + 5u * channel_quads, live), x); }
        if (CHANNELS > 6u) { sums.c6 = add_term(sums.c6, dy_segment(d_at + 6u * channel_quads, live), x); }
        if (CHANNELS > 7u) { sums.c7 = add_term(sums.c7, dy_segment(d_at + 7u * channel_quads, live), x); }
        segment++;
        if (segment == p.row_segments) {
            segment = 0u;
            oy++;
            if (oy == out_h) {
                oy = 0u;
                sample++;
            }
        }
    }
    let taps = KH * KW;
    let channel_at = (p.first_split + split) * p.m * p.n * taps + ci * taps;
    let per_channel = p.n * taps;
    store_filter(channel_at, sums.c0);
    if (CHANNELS > 1u) { store_filter(channel_at + per_channel, sums.c1); }
    if (CHANNELS > 2u) { store_filter(channel_at + 2u * per_channel, sums.c2); }
    if (CHANNELS > 3u) { store_filter(channel_at + 3u * per_channel, sums.c3); }
    if (CHANNELS > 4u) { store_filter(channel_at + 4u * per_channel, sums.c4); }
    if (CHANNELS > 5u) { store_filter(channel_at + 5u * per_channel, sums.c5); }
    if (CHANNELS > 6u) { store_filter(channel_at + 6u * per_channel, sums.c6); }
    if (CHANNELS > 7u) { store_filter(channel_at + 7u * per_channel, sums.c7); }
}

// The input of the row kernels: every row of an NCHW tensor (samples at
// `at`) copied into a row of `padded_w` floats (a multiple of 4) starting
// `pad_w` zeros in, zeros after it. One row per invocation: the index
// arithmetic (integer divisions run one lane at a time on CPU adapters) is
// done once for the row's vec4s.
struct RowPadding {
    rows_per_sample: u32,
    w: u32,
    padded_w: u32,
    pad_w: u32,
    rows: u32,
    _pad: u32,
    at: vec2<u32>,
}

@group(0) @binding(0) var<uniform> row_padding: RowPadding;
@group(0) @binding(11) var<storage, read_write> padded_rows: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn pad_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_index(gid, nwg);
    let r = row_padding;
    if (row >= r.rows) {
        return;
    }
    let sample = quotient(row, r.rows_per_sample);
    let first = vec4<u32>(r.at.x + sample * r.at.y + (row - sample * r.rows_per_sample) * r.w);
    let row_quads = r.padded_w / 4u;
    var ix = vec4<i32>(0, 1, 2, 3) - i32(r.pad_w);
    for (var q = 0u; q < row_quads; q++) {
        let inside = vec4<u32>(ix) < vec4<u32>(r.w);
        let at = select(vec4<u32>(0u), first + vec4<u32>(ix), inside);
        padded_rows[row * row_quads + q] = select(vec4<f32>(0.0), vec4<f32>(x[at.x], x[at.y], x[at.z], x[at.w]), inside);
        ix += vec4<i32>(4);
    }
}

// conv_filter_gradient: a lane's columns of dweight are whole kernel rows
// (a tap window of WINDOW_W = kw taps; 1 for kernels wider than a tile),
// WINDOW_STEP = stride_w. From one output pixel to the next along a row,
// every tap of a window but the last WINDOW_STEP takes the x its right
// neighbour read: x is gathered stride_w times per kernel row and pixel
// instead of kw times (gathers, one lane and one float at a time on CPU
// adapters, were most of this kernel's time).
override WINDOW_W: u32 = 1u;
override WINDOW_STEP: u32 = 1u;

// Columns per lane: the whole windows that fit in a tile's 16.
fn window_run() -> u32 {
    return (16u / WINDOW_W) * WINDOW_W;
}

// Whether tap slot j of a run takes slot j + WINDOW_STEP's x from the
// previous pixel.
fn slides(j: u32) -> bool {
    return j % WINDOW_W + WINDOW_STEP < WINDOW_W;
}

// Four filter taps (columns of dweight): their input channel's plane
// offset and kernel position.
struct Taps {
    plane_at: vec4<i32>,
    ky: vec4<i32>,
    kx: vec4<i32>,
}

fn taps(col0: u32) -> Taps {
    let col = vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u);
    let per_channel = p.kh * p.kw;
    let in_kernel = col % per_channel;
    // Taps past the end read nothing: a row far above the input.
    let ky = select(vec4<i32>(in_kernel / p.kw), vec4<i32>(-1000000), col >= vec4<u32>(p.n));
    return Taps(vec4<i32>((col / per_channel) * p.x_h * p.x_w), ky, vec4<i32>(in_kernel % p.kw));
}

// x under tap i of `tp` for the output pixel whose top-left tap is (y0, x0).
fn gather_tap(tp: Taps, i: u32, sample_at: i32, y0: i32, x0: i32) -> f32 {
    let iy = tp.ky[i] + y0;
    let ix = tp.kx[i] + x0;
    let inside = u32(iy) < p.x_h && u32(ix) < p.x_w;
    return select(0.0, x[select(0, sample_at + tp.plane_at[i] + iy * i32(p.x_w) + ix, inside)], inside);
}

// The x under a lane's run of taps, slot by slot (slots past the run stay
// zero). Slots are picked by constant index only, so that the compiler keeps
// them in registers.
struct TapWindow {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
}

fn window_slot(w: TapWindow, j: u32) -> f32 {
    switch (j / 4u) {
        case 0u: { return w.q0[j % 4u]; }
        case 1u: { return w.q1[j % 4u]; }
        case 2u: { return w.q2[j % 4u]; }
        default: { return w.q3[j % 4u]; }
    }
}

// Where a lane's taps read x at one output pixel: its taps, the sample's
// first element and the pixel's top-left tap.
struct TapSite {
    tp0: Taps,
    tp1: Taps,
    tp2: Taps,
    tp3: Taps,
    sample_at: i32,
    y0: i32,
    x0: i32,
}

// Slot j at the site's pixel: from slot j + WINDOW_STEP of the previous
// pixel's window `w` where it slides, else gathered.
fn next_slot(w: TapWindow, site: TapSite, fresh: bool, j: u32) -> f32 {
    if (j >= window_run()) {
        return 0.0;
    }
    if (!fresh && slides(j)) {
        return window_slot(w, j + WINDOW_STEP);
    }
    var tp = site.tp3;
    switch (j / 4u) {
        case 0u: { tp = site.tp0; }
        case 1u: { tp = site.tp1; }
        case 2u: { tp = site.tp2; }
        default: {}
    }
    return gather_tap(tp, j % 4u, site.sample_at, site.y0, site.x0);
}

fn next_quad(w: TapWindow, site: TapSite, fresh: bool, j: u32) -> vec4<f32> {
    return vec4<f32>(next_slot(w, site, fresh, j), next_slot(w, site, fresh, j + 1u),
        next_slot(w, site, fresh, j + 2u), next_slot(w, site, fresh, j + 3u));
}

// The window at the site's pixel; `fresh` at the start of a row (nothing
// to slide from).
fn next_window(w: TapWindow, site: TapSite, fresh: bool) -> TapWindow {
    return TapWindow(next_quad(w, site, fresh, 0u), next_quad(w, site, fresh, 4u),
        next_quad(w, site, fresh, 8u), next_quad(w, site, fresh, 12u));
}

// Where the lane's run of columns from c0 on lives; slots past the run
// store nothing.
fn run_columns(c0: u32) -> array<vec4<u32>, 4> {
    let slot = vec4<u32>(0u, 1u, 2u, 3u);
    let run = vec4<u32>(window_run());
    let none = vec4<u32>(NO_COLUMN);
    return array<vec4<u32>, 4>(select(column_offsets(c0), none, slot >= run),
        select(column_offsets(c0 + 4u), none, slot + 4u >= run),
        select(column_offsets(c0 + 8u), none, slot + 8u >= run),
        select(column_offsets(c0 + 12u), none, slot + 12u >= run));
}

// dweight = dy im2col(x)^T: C[c_out, c_in*kh*kw] summed over K = the batch
// chunk's output pixels, A = dy packed k-major. Split `split` of the K range
// (K_LANES of them per workgroup along z) writes its partial sums to C's
// slice first_split + split (reduce.wgsl adds the slices up in a fixed
// order). Splits of whole output rows keep the lanes' windows in step.
@compute @workgroup_size(WG)
fn conv_filter_gradient(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (wid.x * (WG / K_LANES) * window_run() >= p.n) {
        return;
    }
    // Lanes past the last column run on with zero taps and store nothing:
    // A's panels need every lane of a split.
    let c0 = (wid.x * (WG / K_LANES) + lane / K_LANES) * window_run();
    let a_lane = panel_lane(lane);
    let split = wid.z * K_LANES + lane % K_LANES;
    let k0 = split * p.k_split;
    let k1 = min(p.k, k0 + p.k_split);
    let out_h = p.pixels / p.out_w;
    let pixel = k0 % p.pixels;
    var site = TapSite(taps(c0), taps(c0 + 4u), taps(c0 + 8u), taps(c0 + 12u), i32(p.x_at.x + (k0 / p.pixels) * p.x_at.y), 0, 0);
    var oy = pixel / p.out_w;
    var ox = pixel % p.out_w;
    var t: Tile;
    var w: TapWindow;
    var a_k: APanel;
    // One output row (the part of it in this split) per trip: its first
    // pixel's taps gathered, the rest slid along. Kept out of the inner loop,
    // where a branch costs lavapipe about as much as its body every pixel
    // (LeNet: 2 of this kernel's 7 ms).
    for (var kk = k0; kk < k1;) {
        site.y0 = i32(oy * p.stride_h) - p.pad_h;
        site.x0 = i32(ox * p.stride_w) - p.pad_w;
        w = next_window(w, site, true);
        let row_end = min(k1, kk + p.out_w - ox);
        loop {
            let j = (kk - k0) % (8u / K_LANES);
            if (j == 0u) {
                a_k = a_panel(kk, wid.y * ROW_QUADS, a_lane);
            }
            accumulate(&t, panel_rows(a_k, j), array<vec4<f32>, 4>(w.q0, w.q1, w.q2, w.q3));
            kk++;
            if (kk == row_end) {
                break;
            }
            site.x0 += i32(p.stride_w);
            w = next_window(w, site, false);
        }
        ox = 0u;
        oy++;
        if (oy == out_h) {
            oy = 0u;
            site.sample_at += i32(p.x_at.y);
        }
    }
    store_tile(t, (p.first_split + split) * p.m * p.n, wid.y * ROW_QUADS, run_columns(c0));
}

// conv_filter_gradient for a pointwise convolution (1x1, stride 1, no
// padding) over planes of whole vec4s: a lane's 16 columns are 16 input
// channels, and four consecutive pixels of a channel are one vec4 of x
// (x_quads), so B's rows for four k are 16 vec4 loads transposed four
// channels at a time, where the window kernel gathers every float on its
// own and works out where it lives. A, dy's channels at those pixels,
// comes from dy the same way (bound as a, at p.dy_at: its planes have x's
// pixels), not from a k-major copy, whose packing pass (a transpose of all
// of dy) cost about a sixth of the op: dy_panel and dy_quad_rows, in
// gemm_blocked_a.wgsl and gemm_blocked_a_subgroup.wgsl. A trip takes 8 k
// (K_LANES 1) or 4 (K_LANES 2, the most this kernel takes).
struct PixelQuad {
    at: u32,   // x_quads index of the four pixels in the first channel
    quad: u32, // which four of the sample's pixels
    dy: u32,   // a's index of the four pixels in dy's first channel
}

fn next_pixel_quad(q: PixelQuad) -> PixelQuad {
    let wraps = q.quad + 1u == p.pixels / 4u;
    let next_sample = q.at + 1u + (p.x_at.y - p.pixels) / 4u;
    let next_dy = q.dy + 1u + (p.dy_at.y - p.pixels) / 4u;
    return PixelQuad(select(q.at + 1u, next_sample, wraps), select(q.quad + 1u, 0u, wraps), select(q.dy + 1u, next_dy, wraps));
}

// The tile's row quad r (dy's channels 4r..4r+3, past the last one the
// last, never stored) at the four pixels from a[at] on: column j is pixel j.
fn dy_row_quad(at: u32, r: u32) -> mat4x4<f32> {
    let plane = p.pixels / 4u;
    let c = min(vec4<u32>(r * 4u) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    return transpose(mat4x4<f32>(a[at + c.x * plane], a[at + c.y * plane], a[at + c.z * plane], a[at + c.w * plane]));
}

// Row s is pixel s of the four channels whose planes start `planes` (in
// vec4s) after `at`; zeros where the pixels lie past the split (`live`).
fn channel_pixels(at: u32, planes: vec4<u32>, live: bool) -> mat4x4<f32> {
    let m = mat4x4<f32>(x_quads[at + planes.x], x_quads[at + planes.y], x_quads[at + planes.z], x_quads[at + planes.w]);
    return transpose(m) * select(0.0, 1.0, live);
}

// t += A B for the four k of pixel quad q, B's 16 columns being the four
// channels of each of `planes`.
fn accumulate_quad(t: ptr<function, Tile>, d: DyPanel, q: PixelQuad, planes: array<vec4<u32>, 4>, live: bool) {
    let c0 = channel_pixels(q.at, planes[0], live);
    let c1 = channel_pixels(q.at, planes[1], live);
    let c2 = channel_pixels(q.at, planes[2], live);
    let c3 = channel_pixels(q.at, planes[3], live);
    accumulate(t, dy_quad_rows(d, 0u), array<vec4<f32>, 4>(c0[0], c1[0], c2[0], c3[0]));
    accumulate(t, dy_quad_rows(d, 1u), array<vec4<f32>, 4>(c0[1], c1[1], c2[1], c3[1]));
    accumulate(t, dy_quad_rows(d, 2u), array<vec4<f32>, 4>(c0[2], c1[2], c2[2], c3[2]));
    accumulate(t, dy_quad_rows(d, 3u), array<vec4<f32>, 4>(c0[3], c1[3], c2[3], c3[3]));
}

@compute @workgroup_size(WG)
fn conv_filter_gradient_pointwise(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if (wid.x * (WG / K_LANES) * 16u >= p.n) {
        return;
    }
    // Columns past the last channel read the last one and store nothing.
    let c0 = (wid.x * (WG / K_LANES) + lane / K_LANES) * 16u;
    let channel = vec4<u32>(c0) + vec4<u32>(0u, 1u, 2u, 3u);
    let last = vec4<u32>(p.n - 1u);
    let plane = p.pixels / 4u;
    let planes = array<vec4<u32>, 4>(min(channel, last) * plane, min(channel + 4u, last) * plane,
        min(channel + 8u, last) * plane, min(channel + 12u, last) * plane);
    let a_lane = panel_lane(lane);
    let split = wid.z * K_LANES + lane % K_LANES;
    let k0 = split * p.k_split;
    let k1 = min(p.k, k0 + p.k_split);
    let sample = k0 / p.pixels;
    let quad = (k0 - sample * p.pixels) / 4u;
    let dy_at = (p.dy_at.x + sample * p.dy_at.y) / 4u + quad;
    var q = PixelQuad((p.x_at.x + sample * p.x_at.y) / 4u + quad, quad, dy_at);
    var t: Tile;
    for (var kk = k0; kk < k1; kk += 8u / K_LANES) {
        accumulate_quad(&t, dy_panel(q.dy, wid.y * ROW_QUADS, a_lane), q, planes, true);
        q = next_pixel_quad(q);
        if (K_LANES == 1u) {
            accumulate_quad(&t, dy_panel(q.dy, wid.y * ROW_QUADS, a_lane), q, planes, kk + 4u < k1);
            q = next_pixel_quad(q);
        }
    }
    store_tile(t, (p.first_split + split) * p.m * p.n, wid.y * ROW_QUADS, tile_columns(c0 / 4u));
}

// packed[kk * rows_padded + i] = X[i][kk] for i < rows, zero for the
// padding rows: X stored k-major. With kk = g * taps + t, X[i][kk] is read at
// offset + i * row_stride + g * col_stride + (tap_y0 + tap_dy * t / tap_w) *
// kernel_w + tap_x0 + tap_dx * (t % tap_w): a strided matrix when taps = 1,
// an NCHW tensor as [channel][(sample, pixel)] when taps = pixels, and a
// conv weight's taps (a phase's, flipped: negative tap steps) as
// [c_in][(c_out, ty, tx)] for the data gradient.
struct Pack {
    rows: u32,
    k: u32,
    rows_padded: u32,
    row_stride: u32,
    col_stride: u32,
    taps: u32,
    offset: u32,
    tap_w: u32,
    tap_y0: i32,
    tap_x0: i32,
    tap_dy: i32,
    tap_dx: i32,
    kernel_w: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> pack: Pack;
@group(0) @binding(5) var<storage, read> src: array<f32>;
@group(0) @binding(6) var<storage, read_write> packed: array<f32>;

@compute @workgroup_size(WG)
fn pack_k_major(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= pack.rows_padded * pack.k) {
        return;
    }
    let kk = i / pack.rows_padded;
    let row = i % pack.rows_padded;
    let t = kk % pack.taps;
    let tap_y = pack.tap_y0 + pack.tap_dy * i32(t / pack.tap_w);
    let tap_x = pack.tap_x0 + pack.tap_dx * i32(t % pack.tap_w);
    var v = 0.0;
    if (row < pack.rows) {
        v = src[pack.offset + row * pack.row_stride + (kk / pack.taps) * pack.col_stride + u32(tap_y * i32(pack.kernel_w) + tap_x)];
    }
    packed[i] = v;
}

// pack_k_major for more than one group of taps (an NCHW tensor as
// X[channel][(sample, pixel)], a conv weight's taps for the data gradient,
// a strided matrix): one invocation per (group, row), walking its taps in
// order. The per-element kernel spends a dozen integer divisions on each
// float, which CPU adapters run one lane at a time (ResNet: 8.4 ms to pack
// a dy of 3x3-pixel planes, 4.7 MB, and 14 ms for a 512 x 512 x 3 x 3
// weight).
@compute @workgroup_size(WG)
fn pack_groups_k_major(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= pack.rows_padded * (pack.k / pack.taps)) {
        return;
    }
    let g = quotient(i, pack.rows_padded);
    let row = i - g * pack.rows_padded;
    let inside = row < pack.rows;
    let first = i32(pack.offset + row * pack.row_stride + g * pack.col_stride) + pack.tap_x0;
    var out = g * pack.taps * pack.rows_padded + row;
    for (var ty = 0u; ty < pack.taps / pack.tap_w; ty++) {
        let row_at = first + (pack.tap_y0 + pack.tap_dy * i32(ty)) * i32(pack.kernel_w);
        for (var tx = 0u; tx < pack.tap_w; tx++) {
            let at = u32(row_at + pack.tap_dx * i32(tx));
            packed[out] = select(0.0, src[select(0u, at, inside)], inside);
            out += pack.rows_padded;
        }
    }
}

@group(0) @binding(8) var<storage, read> src_quads: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> packed_quads: array<vec4<f32>>;

// Four pixels of row (channel) `row`, whose pixels start at element `at`
// for row 0; zeros for the padding rows.
fn pixel_quad(at: u32, row: u32) -> vec4<f32> {
    let inside = row < pack.rows;
    let v = src_quads[select(0u, (at + row * pack.row_stride) / 4u, inside)];
    return select(vec4<f32>(0.0), v, inside);
}

// pack_k_major where each group of taps is a run of whole vec4s (an NCHW
// tensor as X[channel][(sample, pixel)], a row-major matrix as X[row][k]:
// one group): each invocation moves a 4 x 4 block, four vec4 loads along
// the runs of four rows and four vec4 stores along the rows of four k. CPU
// adapters access memory one lane at a time, a vec4 at about the cost of a
// float; one float per invocation made this pass two thirds of a 7x7
// stem's filter gradient.
@compute @workgroup_size(WG)
fn pack_planes_k_major(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    let row_quads = pack.rows_padded / 4u;
    if (i >= row_quads * (pack.k / 4u)) {
        return;
    }
    let kq = quotient(i, row_quads);
    let row_quad = i - kq * row_quads;
    let kk = kq * 4u;
    let g = quotient(kk, pack.taps);
    let at = pack.offset + g * pack.col_stride + (kk - g * pack.taps);
    let r = row_quad * 4u;
    let v0 = pixel_quad(at, r);
    let v1 = pixel_quad(at, r + 1u);
    let v2 = pixel_quad(at, r + 2u);
    let v3 = pixel_quad(at, r + 3u);
    let out = kk * row_quads + row_quad;
    packed_quads[out] = vec4<f32>(v0.x, v1.x, v2.x, v3.x);
    packed_quads[out + row_quads] = vec4<f32>(v0.y, v1.y, v2.y, v3.y);
    packed_quads[out + 2u * row_quads] = vec4<f32>(v0.z, v1.z, v2.z, v3.z);
    packed_quads[out + 3u * row_quads] = vec4<f32>(v0.w, v1.w, v2.w, v3.w);
}
