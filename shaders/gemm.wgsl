// C[M, N] = A[M, K] * B[K, N] (+ bias[n]), with A and B read through row and
// column strides so one kernel serves Linear forward (x W^T), its data
// gradient (dy W) and its weight gradient (dy^T x) without transposes.
// Each invocation computes a TM x TN register tile.

struct Gemm {
    m: u32,
    n: u32,
    k: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    _pad: u32,
}

const TM: u32 = 4u;
const TN: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Gemm;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

struct Tile {
    row0: u32,
    col0: u32,
    valid: bool,
}

fn tile_of(id: u32) -> Tile {
    let col_tiles = (p.n + TN - 1u) / TN;
    let row_tiles = (p.m + TM - 1u) / TM;
    return Tile((id / col_tiles) * TM, (id % col_tiles) * TN, id < row_tiles * col_tiles);
}

// Rows and columns past the edge are clamped to the last one: their results
// are computed but never stored, which keeps the inner loop branch-free.
fn multiply(t: Tile) -> array<vec4<f32>, TM> {
    var a_base: array<u32, TM>;
    for (var i = 0u; i < TM; i++) {
        a_base[i] = min(t.row0 + i, p.m - 1u) * p.a_row_stride;
    }
    var b_base: array<u32, TN>;
    for (var j = 0u; j < TN; j++) {
        b_base[j] = min(t.col0 + j, p.n - 1u) * p.b_col_stride;
    }
    var acc: array<vec4<f32>, TM>;
    for (var kk = 0u; kk < p.k; kk++) {
        let ak = kk * p.a_col_stride;
        let bk = kk * p.b_row_stride;
        let bv = vec4<f32>(b[bk + b_base[0]], b[bk + b_base[1]], b[bk + b_base[2]], b[bk + b_base[3]]);
        for (var i = 0u; i < TM; i++) {
            acc[i] += a[a_base[i] + ak] * bv;
        }
    }
    return acc;
}

fn store(t: Tile, acc: array<vec4<f32>, TM>) {
    for (var i = 0u; i < TM; i++) {
        let row = t.row0 + i;
        if (row >= p.m) {
            break;
        }
        for (var j = 0u; j < TN; j++) {
            let col = t.col0 + j;
            if (col < p.n) {
                c[row * p.n + col] = activate(acc[i][j]);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = tile_of(linear_index(gid, nwg));
    if (t.valid) {
        store(t, multiply(t));
    }
}

@compute @workgroup_size(WG)
fn matmul_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = tile_of(linear_index(gid, nwg));
    if (!t.valid) {
        return;
    }
    var acc = multiply(t);
    var b: vec4<f32>;
    for (var j = 0u; j < TN; j++) {
        b[j] = bias[min(t.col0 + j, p.n - 1u)];
    }
    for (var i = 0u; i < TM; i++) {
        acc[i] += b;
    }
    store(t, acc);
}
