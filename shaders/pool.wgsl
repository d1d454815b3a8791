// 2-D pooling on NCHW planes, PyTorch floor mode. Average pooling counts
// padded zeros (count_include_pad=True), so every window divides by kh*kw.
// Max pooling ignores padding, keeps the first maximum of each window (row
// by row) and records where it was, so the backward pass can route dy there.

struct Pool {
    planes: u32, // batch * channels
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    channels: u32,
    // graph::Layout of src and dst: (offset, sample stride)
    src_at: vec2<u32>,
    dst_at: vec2<u32>,
    // Where the (contiguous) argmax tensor starts in its binding: a batch
    // chunk's first element need not start the binding.
    argmax_offset: u32,
    _pad: u32,
    // *_backward_activated: graph::Layout of act_out.
    act_at: vec2<u32>,
}

// The window (kernel, stride, padding): constants, so that its loops unroll.
override KH: u32 = 1u;
override KW: u32 = 1u;
override STRIDE_H: u32 = 1u;
override STRIDE_W: u32 = 1u;
override PAD_H: u32 = 0u;
override PAD_W: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Pool;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(4) var<storage, read> argmax_in: array<u32>;
// The output of the activation whose input this pool read, for the
// backward kernels with that activation's backward fused in (graph::fusion).
@group(0) @binding(5) var<storage, read> act_out: array<f32>;
// dst and act_out as vec4s, for the *_quads backward kernels.
@group(0) @binding(6) var<storage, read_write> dst_quads: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> act_out_quads: array<vec4<f32>>;

// Where plane `plane` (= sample * channels + channel) of a tensor laid out
// as `l`, with `plane_len` elements per plane, starts: a plane never spans
// two samples, so its elements follow one another from there.
fn plane_start(l: vec2<u32>, plane: u32, plane_len: u32) -> u32 {
    return strided(l, p.channels * plane_len, plane * plane_len);
}

// Flat element i of a stack of h x w planes as (plane, y, x).
struct Pixel {
    plane: u32,
    y: u32,
    x: u32,
}

fn pixel_of(i: u32, h: u32, w: u32) -> Pixel {
    let plane = quotient(i, h * w);
    let at = i - plane * (h * w);
    let y = quotient(at, w);
    return Pixel(plane, y, at - y * w);
}

// The windows covering input row (or column) `y` are among the `count`
// ones counting down from `last`: window o of `outputs` covers y when
// o * stride <= y + pad < o * stride + k. Every lane runs the same `count`
// steps; `covers` drops the windows that do not cover y.
struct Covering {
    last: u32,
    count: u32,
    padded_y: u32,
    stride: u32,
    k: u32,
    outputs: u32,
}

fn covering(y: u32, pad: u32, stride: u32, k: u32, outputs: u32) -> Covering {
    return Covering((y + pad) / stride, (k + stride - 1u) / stride, y + pad, stride, k, outputs);
}

fn covers(c: Covering, step: u32) -> bool {
    let o = c.last - step;
    return c.last >= step && o < c.outputs && o * c.stride + c.k > c.padded_y;
}

// Where element e of the pool's input lives in a tensor laid out as `l`.
fn input_at(l: vec2<u32>, e: Pixel) -> u32 {
    return plane_start(l, e.plane, p.h * p.w) + e.y * p.w + e.x;
}

// Where output o lives in a tensor of the pool's output shape laid out as `l`.
fn pooled_at(l: vec2<u32>, o: Pixel) -> u32 {
    return plane_start(l, o.plane, p.ho * p.wo) + o.y * p.wo + o.x;
}

@compute @workgroup_size(WG)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho * p.wo) {
        return;
    }
    let o = pixel_of(i, p.ho, p.wo);
    let src0 = plane_start(p.src_at, o.plane, p.h * p.w);
    let y0 = i32(o.y * STRIDE_H) - i32(PAD_H);
    let x0 = i32(o.x * STRIDE_W) - i32(PAD_W);
    var sum = 0.0;
    for (var ky = 0u; ky < KH; ky++) {
        let y = y0 + i32(ky);
        for (var kx = 0u; kx < KW; kx++) {
            let x = x0 + i32(kx);
            let inside = u32(y) < p.h && u32(x) < p.w;
            let v = src[select(src0, src0 + u32(y) * p.w + u32(x), inside)];
            sum += select(0.0, v, inside);
        }
    }
    dst[pooled_at(p.dst_at, o)] = sum / f32(KH * KW);
}

// Each input element gathers dy / (kh*kw) from every window that covers it,
// so no two invocations write the same element (no atomics).
fn avg_gradient(e: Pixel) -> f32 {
    let src0 = plane_start(p.src_at, e.plane, p.ho * p.wo);
    let rows = covering(e.y, PAD_H, STRIDE_H, KH, p.ho);
    let cols = covering(e.x, PAD_W, STRIDE_W, KW, p.wo);
    var sum = 0.0;
    for (var ty = 0u; ty < rows.count; ty++) {
        let row_ok = covers(rows, ty);
        for (var tx = 0u; tx < cols.count; tx++) {
            let ok = row_ok && covers(cols, tx);
            let v = src[select(src0, src0 + (rows.last - ty) * p.wo + cols.last - tx, ok)];
            sum += select(0.0, v, ok);
        }
    }
    return sum / f32(KH * KW);
}


@compute @workgroup_size(WG)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.h * p.w) {
        let e = pixel_of(i, p.h, p.w);
        dst[input_at(p.dst_at, e)] = avg_gradient(e);
    }
}

@compute @workgroup_size(WG)
fn avg_backward_activated(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.h * p.w) {
        let e = pixel_of(i, p.h, p.w);
        dst[input_at(p.dst_at, e)] = activation_backward(ACTIVATION, act_out[input_at(p.act_at, e)], avg_gradient(e));
    }
}

// Four neighbouring outputs of a row per invocation (the row's last run may
// be shorter): a window row's inputs are read once for all four windows,
// not once per window that holds them.
const RUN = 4u;

// The runs that cover a row of n elements.
fn runs(n: u32) -> u32 {
    return (n + RUN - 1u) / RUN;
}

// Where output o's argmax lives: the argmax tensor is contiguous.
fn argmax_at(o: Pixel) -> u32 {
    return p.argmax_offset + (o.plane * p.ho + o.y) * p.wo + o.x;
}

@compute @workgroup_size(WG)
fn max_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho * runs(p.wo)) {
        return;
    }
    let run = pixel_of(i, p.ho, runs(p.wo));
    let ox0 = run.x * RUN;
    let src0 = plane_start(p.src_at, run.plane, p.h * p.w);
    let y0 = i32(run.y * STRIDE_H) - i32(PAD_H);
    let x0 = i32(ox0 * STRIDE_W) - i32(PAD_W);
    var best = vec4<f32>(0.0);
    var best_at = vec4<u32>(0xffffffffu);
    for (var ky = 0u; ky < KH; ky++) {
        let y = y0 + i32(ky);
        // Input s of the run's span is tap s - j * STRIDE_W of output j.
        for (var s = 0u; s < (RUN - 1u) * STRIDE_W + KW; s++) {
            let x = x0 + i32(s);
            let inside = u32(y) < p.h && u32(x) < p.w;
            let at = u32(y) * p.w + u32(x);
            let v = src[select(src0, src0 + at, inside)];
            for (var j = 0u; j < RUN; j++) {
                if (s >= j * STRIDE_W && s < j * STRIDE_W + KW) {
                    // Strictly greater keeps the first maximum; NaN wins, as in PyTorch.
                    let better = inside && (best_at[j] == 0xffffffffu || v > best[j] || v != v);
                    best[j] = select(best[j], v, better);
                    best_at[j] = select(best_at[j], at, better);
                }
            }
        }
    }
    for (var j = 0u; j < RUN; j++) {
        let o = Pixel(run.plane, run.y, ox0 + j);
        if (o.x < p.wo) {
            dst[pooled_at(p.dst_at, o)] = best[j];
            argmax[argmax_at(o)] = best_at[j];
        }
    }
}

// The backward kernels four input elements at a time, for rows of whole
// vec4s (w % 4 == 0, layouts in whole vec4s): one element's index arithmetic
// and one vec4 load and store for four. CPU adapters access memory one lane
// at a time, a vec4 at about the cost of a float.
fn quad_of(i: u32) -> Pixel {
    return pixel_of(4u * i, p.h, p.w);
}

fn next(e: Pixel, dx: u32) -> Pixel {
    return Pixel(e.plane, e.y, e.x + dx);
}

fn avg_gradients(e: Pixel) -> vec4<f32> {
    return vec4<f32>(avg_gradient(e), avg_gradient(next(e, 1u)), avg_gradient(next(e, 2u)), avg_gradient(next(e, 3u)));
}

// Max pooling's gradient takes two rows by four elements of dx per
// invocation (fewer at a plane's last row and a row's end): with stride 2
// the windows that cover two neighbouring rows are as many as cover one.
struct Block {
    top: vec4<f32>,
    bottom: vec4<f32>,
}

// dx[y, x] = the sum of dy over the windows whose maximum was at (y, x),
// for the block from e on, with each window that covers any of it read
// once: the windows covering the block's last element counting down, as
// many as reach back to its first. A window's argmax names at most one
// element of the block, and only one inside it.
fn max_gradients(e: Pixel) -> Block {
    let top = vec4<u32>(e.y * p.w + e.x) + vec4<u32>(0u, 1u, 2u, 3u);
    let bottom = top + vec4<u32>(p.w);
    let src0 = plane_start(p.src_at, e.plane, p.ho * p.wo);
    let argmax0 = argmax_at(Pixel(e.plane, 0u, 0u));
    let last_row = (e.y + 1u + PAD_H) / STRIDE_H;
    let last_column = (e.x + 3u + PAD_W) / STRIDE_W;
    var sum: Block;
    for (var ty = 0u; ty < KH / STRIDE_H + 1u; ty++) {
        let row_ok = last_row >= ty && last_row - ty < p.ho;
        for (var tx = 0u; tx < (KW + 2u) / STRIDE_W + 1u; tx++) {
            let ok = vec4<bool>(row_ok && last_column >= tx && last_column - tx < p.wo);
            let o = select(0u, (last_row - ty) * p.wo + last_column - tx, ok.x);
            let at = vec4<u32>(argmax_in[argmax0 + o]);
            let dy = vec4<f32>(src[src0 + o]);
            sum.top += select(vec4<f32>(0.0), dy, ok & (at == top));
            sum.bottom += select(vec4<f32>(0.0), dy, ok & (at == bottom));
        }
    }
    return sum;
}

fn block_start(i: u32) -> Pixel {
    let block = pixel_of(i, (p.h + 1u) / 2u, runs(p.w));
    return Pixel(block.plane, 2u * block.y, block.x * RUN);
}

fn has_block(i: u32) -> bool {
    return i < p.planes * ((p.h + 1u) / 2u) * runs(p.w);
}

// The block's second row, or at a plane's last row (whose block has no
// second row to store) the first.
fn below(e: Pixel) -> Pixel {
    return Pixel(e.plane, min(e.y + 1u, p.h - 1u), e.x);
}

@compute @workgroup_size(WG)
fn avg_backward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (4u * i < p.planes * p.h * p.w) {
        let e = quad_of(i);
        dst_quads[input_at(p.dst_at, e) / 4u] = avg_gradients(e);
    }
}

@compute @workgroup_size(WG)
fn avg_backward_activated_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (4u * i < p.planes * p.h * p.w) {
        let e = quad_of(i);
        let y = act_out_quads[input_at(p.act_at, e) / 4u];
        dst_quads[input_at(p.dst_at, e) / 4u] = activation_backward4(y, avg_gradients(e));
    }
}

// Writes a block's gradients g from e on, as a vec4 per row.
fn store_block_quads(e: Pixel, g: Block) {
    dst_quads[input_at(p.dst_at, e) / 4u] = g.top;
    if (e.y + 1u < p.h) {
        dst_quads[input_at(p.dst_at, below(e)) / 4u] = g.bottom;
    }
}

// g passed through the fused activation's backward.
fn activated_block_quads(e: Pixel, g: Block) -> Block {
    let y = act_out_quads[input_at(p.act_at, e) / 4u];
    let y_below = act_out_quads[input_at(p.act_at, below(e)) / 4u];
    return Block(activation_backward4(y, g.top), activation_backward4(y_below, g.bottom));
}

@compute @workgroup_size(WG)
fn max_backward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_block(i)) {
        let e = block_start(i);
        store_block_quads(e, max_gradients(e));
    }
}

@compute @workgroup_size(WG)
fn max_backward_activated_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_block(i)) {
        let e = block_start(i);
        store_block_quads(e, activated_block_quads(e, max_gradients(e)));
    }
}

// max_backward_quads for rows that are not whole vec4s, one float at a time.
fn store_run(e: Pixel, g: vec4<f32>) {
    for (var j = 0u; j < RUN; j++) {
        if (e.x + j < p.w) {
            dst[input_at(p.dst_at, next(e, j))] = g[j];
        }
    }
}

fn store_block(e: Pixel, g: Block) {
    store_run(e, g.top);
    if (e.y + 1u < p.h) {
        store_run(below(e), g.bottom);
    }
}

// g passed through the fused activation's backward (past the row's end,
// where nothing is stored, with the row's last output).
fn activated_run(e: Pixel, g: vec4<f32>) -> vec4<f32> {
    var y: vec4<f32>;
    for (var j = 0u; j < RUN; j++) {
        y[j] = act_out[input_at(p.act_at, next(e, min(j, p.w - 1u - e.x)))];
    }
    return activation_backward4(y, g);
}

fn activated_block(e: Pixel, g: Block) -> Block {
    return Block(activated_run(e, g.top), activated_run(below(e), g.bottom));
}

@compute @workgroup_size(WG)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_block(i)) {
        let e = block_start(i);
        store_block(e, max_gradients(e));
    }
}

@compute @workgroup_size(WG)
fn max_backward_activated(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_block(i)) {
        let e = block_start(i);
        store_block(e, activated_block(e, max_gradients(e)));
    }
}

// 2 x 2 windows with stride 2 and no padding (LeNet's and DenseNet's
// average pools, VGG's max pools), where rows are even and every layout
// starts on an even element: each invocation reads a window's two rows as
// two vec2s, and the gradients write a window's four elements with two
// vec2 stores (the windows tile the input: no two share an element). One
// invocation per output element, and no window arithmetic.
@group(0) @binding(8) var<storage, read> src_pairs: array<vec2<f32>>;
@group(0) @binding(9) var<storage, read_write> dst_pairs: array<vec2<f32>>;
@group(0) @binding(10) var<storage, read> act_out_pairs: array<vec2<f32>>;

// Where the top-left element of output o's window lives in a tensor laid
// out as `l`.
fn window_at(l: vec2<u32>, o: Pixel) -> u32 {
    return input_at(l, Pixel(o.plane, 2u * o.y, 2u * o.x));
}

// The window's elements row by row: (top.x, top.y, bottom.x, bottom.y).
fn window_2x2(o: Pixel) -> vec4<f32> {
    let at = window_at(p.src_at, o) / 2u;
    let top = src_pairs[at];
    let bottom = src_pairs[at + p.w / 2u];
    return vec4<f32>(top, bottom);
}

// A window's mean, in avg_forward's order of additions.
fn window_mean(v: vec4<f32>) -> f32 {
    return (((0.0 + v.x) + v.y) + v.z + v.w) / 4.0;
}

// A window's maximum and where in its plane it is, for the window whose
// top-left element is at `top_left`.
struct WindowMax {
    best: f32,
    at: u32,
}

fn window_max(v: vec4<f32>, top_left: u32) -> WindowMax {
    let offsets = vec4<u32>(0u, 1u, p.w, p.w + 1u);
    var m = WindowMax(v.x, top_left);
    for (var k = 1u; k < 4u; k++) {
        // As max_forward: the first maximum, and NaN wins.
        if (v[k] > m.best || v[k] != v[k]) {
            m = WindowMax(v[k], top_left + offsets[k]);
        }
    }
    return m;
}

// The in-plane index of output o's window's top-left element.
fn top_left_of(o: Pixel) -> u32 {
    return 2u * o.y * p.w + 2u * o.x;
}

@compute @workgroup_size(WG)
fn avg_forward_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        dst[pooled_at(p.dst_at, o)] = window_mean(window_2x2(o));
    }
}

@compute @workgroup_size(WG)
fn max_forward_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        let m = window_max(window_2x2(o), top_left_of(o));
        dst[pooled_at(p.dst_at, o)] = m.best;
        argmax[p.argmax_offset + i] = m.at;
    }
}

// Writes a window's four input gradients g, row by row.
fn store_window(o: Pixel, g: vec4<f32>) {
    let at = window_at(p.dst_at, o) / 2u;
    dst_pairs[at] = g.xy;
    dst_pairs[at + p.w / 2u] = g.zw;
}

// g passed through the fused activation's backward.
fn activated_window(o: Pixel, g: vec4<f32>) -> vec4<f32> {
    let y = window_at(p.act_at, o) / 2u;
    return activation_backward4(vec4<f32>(act_out_pairs[y], act_out_pairs[y + p.w / 2u]), g);
}

// avg_gradient's dy / 4 for each element of the window.
fn avg_window_gradient(o: Pixel) -> vec4<f32> {
    return vec4<f32>(src[pooled_at(p.src_at, o)] / 4.0);
}

// dy at the element of the window from `top_left` on that `argmax` (an
// in-plane index) names, zeros elsewhere; row by row.
fn routed(dy: f32, argmax_at: u32, top_left: u32) -> vec4<f32> {
    let at = argmax_at - top_left;
    let k = select(at, 2u + at - p.w, at >= p.w);
    return select(vec4<f32>(0.0), vec4<f32>(dy), vec4<u32>(0u, 1u, 2u, 3u) == vec4<u32>(k));
}

// dy of output i at the window element argmax names, zeros elsewhere.
fn max_window_gradient(i: u32, o: Pixel) -> vec4<f32> {
    return routed(src[pooled_at(p.src_at, o)], argmax_in[p.argmax_offset + i], top_left_of(o));
}

@compute @workgroup_size(WG)
fn avg_backward_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        store_window(o, avg_window_gradient(o));
    }
}

@compute @workgroup_size(WG)
fn avg_backward_activated_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        store_window(o, activated_window(o, avg_window_gradient(o)));
    }
}

@compute @workgroup_size(WG)
fn max_backward_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        store_window(o, max_window_gradient(i, o));
    }
}

@compute @workgroup_size(WG)
fn max_backward_activated_2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.planes * p.ho * p.wo) {
        let o = pixel_of(i, p.ho, p.wo);
        store_window(o, activated_window(o, max_window_gradient(i, o)));
    }
}

// Two 2 x 2 windows side by side per invocation (outputs o and o + 1 of a
// row, o.x even), where the input's rows are whole vec4s: each row of the
// pair is one vec4 load or store, the pooled pair one vec2 and the argmax
// pair one vec2<u32>. Half the invocations and index arithmetic, and a
// quarter of the input side's memory operations, of the *_2x2 kernels
// (LeNet's first pool).
@group(0) @binding(11) var<storage, read> src_quads: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> argmax_pairs: array<vec2<u32>>;
@group(0) @binding(13) var<storage, read> argmax_in_pairs: array<vec2<u32>>;

// The rows of a pair of windows: the left window is (top.xy, bottom.xy).
struct WindowPair {
    top: vec4<f32>,
    bottom: vec4<f32>,
}

fn left(w: WindowPair) -> vec4<f32> {
    return vec4<f32>(w.top.xy, w.bottom.xy);
}

fn right(w: WindowPair) -> vec4<f32> {
    return vec4<f32>(w.top.zw, w.bottom.zw);
}

// Two windows' gradients (each row by row) as the pair's rows.
fn pair_rows(l: vec4<f32>, r: vec4<f32>) -> WindowPair {
    return WindowPair(vec4<f32>(l.xy, r.xy), vec4<f32>(l.zw, r.zw));
}

// The first of the two outputs invocation i takes, and whether it has any.
fn pair_output(i: u32) -> Pixel {
    return pixel_of(2u * i, p.ho, p.wo);
}

fn has_pair(i: u32) -> bool {
    return 2u * i < p.planes * p.ho * p.wo;
}

fn window_pair(o: Pixel) -> WindowPair {
    let at = window_at(p.src_at, o) / 4u;
    return WindowPair(src_quads[at], src_quads[at + p.w / 4u]);
}

fn store_window_pair(o: Pixel, g: WindowPair) {
    let at = window_at(p.dst_at, o) / 4u;
    dst_quads[at] = g.top;
    dst_quads[at + p.w / 4u] = g.bottom;
}

// g passed through the fused activation's backward.
fn activated_pair(o: Pixel, g: WindowPair) -> WindowPair {
    let y = window_at(p.act_at, o) / 4u;
    return WindowPair(activation_backward4(act_out_quads[y], g.top), activation_backward4(act_out_quads[y + p.w / 4u], g.bottom));
}

// The pair's dy.
fn pooled_pair(o: Pixel) -> vec2<f32> {
    return src_pairs[pooled_at(p.src_at, o) / 2u];
}

// avg_window_gradient for both windows.
fn avg_pair_gradient(o: Pixel) -> WindowPair {
    let dy = pooled_pair(o);
    return pair_rows(vec4<f32>(dy.x / 4.0), vec4<f32>(dy.y / 4.0));
}

// max_window_gradient for both windows.
fn max_pair_gradient(i: u32, o: Pixel) -> WindowPair {
    let dy = pooled_pair(o);
    let at = argmax_in_pairs[(p.argmax_offset + 2u * i) / 2u];
    let top_left = top_left_of(o);
    return pair_rows(routed(dy.x, at.x, top_left), routed(dy.y, at.y, top_left + 2u));
}

@compute @workgroup_size(WG)
fn avg_forward_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        let w = window_pair(o);
        dst_pairs[pooled_at(p.dst_at, o) / 2u] = vec2<f32>(window_mean(left(w)), window_mean(right(w)));
    }
}

@compute @workgroup_size(WG)
fn max_forward_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        let w = window_pair(o);
        let l = window_max(left(w), top_left_of(o));
        let r = window_max(right(w), top_left_of(o) + 2u);
        dst_pairs[pooled_at(p.dst_at, o) / 2u] = vec2<f32>(l.best, r.best);
        argmax_pairs[(p.argmax_offset + 2u * i) / 2u] = vec2<u32>(l.at, r.at);
    }
}

@compute @workgroup_size(WG)
fn avg_backward_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        store_window_pair(o, avg_pair_gradient(o));
    }
}

@compute @workgroup_size(WG)
fn avg_backward_activated_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        store_window_pair(o, activated_pair(o, avg_pair_gradient(o)));
    }
}

@compute @workgroup_size(WG)
fn max_backward_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        store_window_pair(o, max_pair_gradient(i, o));
    }
}

@compute @workgroup_size(WG)
fn max_backward_activated_2x2_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (has_pair(i)) {
        let o = pair_output(i);
        store_window_pair(o, activated_pair(o, max_pair_gradient(i, o)));
    }
}

// A 1x1 window with stride 2 and no padding picks x[:, :, ::2, ::2]: the
// even pixels a 1x1 convolution with stride 2 reads (nn::ConvParameters
// applies ResNet's shortcuts so). Where h is even and output rows are
// whole vec4s (w a multiple of 8), one output row per invocation: each
// output vec4 is the first and third floats of two of the input row's,
// where the element kernel takes an invocation and a float load per
// output element. The gradient writes each dy row's two dx rows: dy's
// values with a zero after each, then a row of zeros, where the quads
// kernel works out the windows over every four inputs. (ResNet's first
// shortcut at batch 128 on lavapipe: 8.2 -> 3.4 ms, gradient 11.4 -> 3.8.)
// Output row i's first pixel: pixel_of(i * wo, ho, wo) in one division
// rather than two, which cost these three-vec4 rows 0.2-0.3 ms of the 3.
fn row_of(i: u32) -> Pixel {
    let plane = quotient(i, p.ho);
    return Pixel(plane, i - plane * p.ho, 0u);
}

@compute @workgroup_size(WG)
fn avg_forward_even_pixels(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho) {
        return;
    }
    let o = row_of(i);
    let read_at = window_at(p.src_at, o) / 4u;
    let write_at = pooled_at(p.dst_at, o) / 4u;
    for (var q = 0u; q < p.wo / 4u; q++) {
        let l = src_quads[read_at + 2u * q];
        let r = src_quads[read_at + 2u * q + 1u];
        dst_quads[write_at + q] = vec4<f32>(l.x, l.z, r.x, r.z);
    }
}

@compute @workgroup_size(WG)
fn avg_backward_even_pixels(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho) {
        return;
    }
    let o = row_of(i);
    let read_at = pooled_at(p.src_at, o) / 4u;
    let write_at = window_at(p.dst_at, o) / 4u;
    let below = write_at + p.w / 4u;
    for (var q = 0u; q < p.wo / 4u; q++) {
        let g = src_quads[read_at + q];
        dst_quads[write_at + 2u * q] = vec4<f32>(g.x, 0.0, g.y, 0.0);
        dst_quads[write_at + 2u * q + 1u] = vec4<f32>(g.z, 0.0, g.w, 0.0);
        dst_quads[below + 2u * q] = vec4<f32>(0.0);
        dst_quads[below + 2u * q + 1u] = vec4<f32>(0.0);
    }
}
