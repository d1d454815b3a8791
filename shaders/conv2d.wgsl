// 2-D convolution (PyTorch Conv2d, NCHW, weight [c_out, c_in, kh, kw]) as
// implicit GEMMs: no im2col matrix is ever materialised.
//
//   forward          y[n, co, oy, ox]  = bias[co] + sum_{ci,ky,kx} w[co, ci, ky, kx] x[n, ci, oy*s-p+ky, ox*s-p+kx]
//   backward_data    dx[n, ci, iy, ix] = sum_{co,ky,kx} w[co, ci, ky, kx] dy[n, co, (iy+p-ky)/s, (ix+p-kx)/s]
//   backward_filter  dw[co, ci, ky, kx] = sum_{n,oy,ox} dy[n, co, oy, ox] x[n, ci, oy*s-p+ky, ox*s-p+kx]
//
// Every kernel has the same shape: all invocations of a workgroup share a
// block of TC channels (workgroup_id.y), so their weight (or dy) loads are
// uniform and cost one broadcast; each invocation owns four pixels (or
// filter taps) in a vec4, gathers their inputs once per tap and reuses them
// for all TC channels: TC x 4 register tile, 4*TC FMAs per 4 gathers.
//
// backward_filter sums over batch and positions, a long K for a small
// output, so it is split (workgroup_id.z): each split writes partial sums
// that reduce.wgsl adds up in a fixed order.

struct Conv {
    batch: u32,
    c_in: u32,
    h: u32,
    w: u32,
    c_out: u32,
    kh: u32,
    kw: u32,
    ho: u32,
    wo: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: u32,
    pad_w: u32,
    splits: u32, // backward_filter only
    chunk: u32,  // backward_filter: output positions per split
    first_split: u32, // backward_filter: this batch chunk's first split
    // graph::Layout of each tensor: (offset, sample stride)
    x_at: vec2<u32>,
    y_at: vec2<u32>,
    dy_at: vec2<u32>,
    dx_at: vec2<u32>,
}

override TC: u32 = 8u; // channels per invocation, at most MAX_TC
const MAX_TC: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Conv;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read_write> dweight_partial: array<f32>;

const LANES = vec4<u32>(0u, 1u, 2u, 3u);

// x at flat indices `at` where `inside`, else 0 (the padding).
fn gather_x(at: vec4<i32>, inside: vec4<bool>) -> vec4<f32> {
    let i = vec4<u32>(select(vec4<i32>(0), at, inside));
    let v = vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]);
    return select(vec4<f32>(0.0), v, inside);
}

fn gather_dy(at: vec4<i32>, inside: vec4<bool>) -> vec4<f32> {
    let i = vec4<u32>(select(vec4<i32>(0), at, inside));
    let v = vec4<f32>(dy[i.x], dy[i.y], dy[i.z], dy[i.w]);
    return select(vec4<f32>(0.0), v, inside);
}

@compute @workgroup_size(WG)
fn forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let plane = p.ho * p.wo;
    let pixels = p.batch * plane;
    // No early return for invocations past the end: lavapipe loads a
    // workgroup-uniform address once only while invocation 0 is surely
    // active. They compute clamped duplicates and store nothing.
    let q0 = (lane_group(wid, nwg) * WG + lane) * 4u;
    let co0 = wid.y * TC;
    let q = min(vec4<u32>(q0) + LANES, vec4<u32>(pixels - 1u));
    let r = q % plane;
    let image = vec4<i32>(p.x_at.x + (q / plane) * p.x_at.y);
    let iy0 = vec4<i32>((r / p.wo) * p.stride_h) - i32(p.pad_h);
    let ix0 = vec4<i32>((r % p.wo) * p.stride_w) - i32(p.pad_w);
    let h = i32(p.h);
    let w = i32(p.w);
    let taps = p.c_in * p.kh * p.kw;

    var acc: array<vec4<f32>, MAX_TC>;
    var tap = 0u;
    for (var ci = 0u; ci < p.c_in; ci++) {
        let plane_base = image + i32(ci * p.h * p.w);
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = iy0 + i32(ky);
            let row_inside = (iy >= vec4<i32>(0)) & (iy < vec4<i32>(h));
            let row = plane_base + iy * w;
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = ix0 + i32(kx);
                let xv = gather_x(row + ix, row_inside & (ix >= vec4<i32>(0)) & (ix < vec4<i32>(w)));
                for (var c = 0u; c < TC; c++) {
                    acc[c] += weight[min(co0 + c, p.c_out - 1u) * taps + tap] * xv;
                }
                tap++;
            }
        }
    }

    let out_image = p.y_at.x + (q / plane) * p.y_at.y + r;
    for (var c = 0u; c < TC; c++) {
        let co = co0 + c;
        if (co >= p.c_out) {
            break;
        }
        let v = acc[c] + bias[co];
        for (var j = 0u; j < 4u; j++) {
            if (q0 + j < pixels) {
                y[out_image[j] + co * plane] = activate(v[j]);
            }
        }
    }
}

// A data gradient followed by the backward of the activation before the
// convolution (graph::fusion) carries each result on through it as it
// stores: ACTIVATION's backward, from the activation's output (the
// convolution's input, bound as x), so the gradient between the two is
// never written.
override ACTIVATION_BACKWARD: bool = false;

@compute @workgroup_size(WG)
fn backward_data(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let plane = p.h * p.w;
    let pixels = p.batch * plane;
    // No early return for invocations past the end: lavapipe loads a
    // workgroup-uniform address once only while invocation 0 is surely
    // active. They compute clamped duplicates and store nothing.
    let q0 = (lane_group(wid, nwg) * WG + lane) * 4u;
    let ci0 = wid.y * TC;
    let q = min(vec4<u32>(q0) + LANES, vec4<u32>(pixels - 1u));
    let r = q % plane;
    let out_plane = p.ho * p.wo;
    let image = vec4<i32>(p.dy_at.x + (q / plane) * p.dy_at.y);
    // Output position (oy, ox) meets input (iy, ix) through tap (ky, kx)
    // when oy * s = iy + p - ky.
    let ty0 = vec4<i32>(r / p.w + p.pad_h);
    let tx0 = vec4<i32>(r % p.w + p.pad_w);
    let sh = i32(p.stride_h);
    let sw = i32(p.stride_w);
    let taps = p.kh * p.kw;

    var acc: array<vec4<f32>, MAX_TC>;
    for (var co = 0u; co < p.c_out; co++) {
        let dy_plane = image + i32(co * out_plane);
        let w_co = co * p.c_in * taps;
        for (var ky = 0u; ky < p.kh; ky++) {
            let ty = ty0 - i32(ky);
            let oy = ty / sh;
            let row_inside = (ty >= vec4<i32>(0)) & (oy * sh == ty) & (oy < vec4<i32>(i32(p.ho)));
            let row = dy_plane + oy * i32(p.wo);
            for (var kx = 0u; kx < p.kw; kx++) {
                let tx = tx0 - i32(kx);
                let ox = tx / sw;
                let inside = row_inside & (tx >= vec4<i32>(0)) & (ox * sw == tx) & (ox < vec4<i32>(i32(p.wo)));
                let dv = gather_dy(row + ox, inside);
                let tap = ky * p.kw + kx;
                for (var c = 0u; c < TC; c++) {
                    acc[c] += weight[w_co + min(ci0 + c, p.c_in - 1u) * taps + tap] * dv;
                }
            }
        }
    }

    let out_image = p.dx_at.x + (q / plane) * p.dx_at.y + r;
    let act_image = p.x_at.x + (q / plane) * p.x_at.y + r;
    for (var c = 0u; c < TC; c++) {
        let ci = ci0 + c;
        if (ci >= p.c_in) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            if (q0 + j < pixels) {
                var v = acc[c][j];
                if (ACTIVATION_BACKWARD) {
                    v = activation_backward(ACTIVATION, x[act_image[j] + ci * plane], v);
                }
                dx[out_image[j] + ci * plane] = v;
            }
        }
    }
}

// Grid: x = tap groups, y = output-channel blocks, z = splits of the positions.
@compute @workgroup_size(WG)
fn backward_filter(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let taps = p.c_in * p.kh * p.kw;
    let t0 = (wid.x * WG + lane) * 4u; // past the end: clamped, not stored
    let co0 = wid.y * TC;
    let split = wid.z;
    let t = min(vec4<u32>(t0) + LANES, vec4<u32>(taps - 1u));
    let window = p.kh * p.kw;
    let tap_plane = vec4<i32>((t / window) * p.h * p.w);
    let tap_y = vec4<i32>((t / p.kw) % p.kh) - i32(p.pad_h);
    let tap_x = vec4<i32>(t % p.kw) - i32(p.pad_w);
    let h = i32(p.h);
    let w = i32(p.w);

    let plane = p.ho * p.wo;
    let first = split * p.chunk;
    let last = min(first + p.chunk, p.batch * plane);
    var acc: array<vec4<f32>, MAX_TC>;
    for (var q = first; q < last; q++) {
        let n = q / plane;
        let r = q % plane;
        let iy = tap_y + i32((r / p.wo) * p.stride_h);
        let ix = tap_x + i32((r % p.wo) * p.stride_w);
        let inside = (iy >= vec4<i32>(0)) & (iy < vec4<i32>(h)) & (ix >= vec4<i32>(0)) & (ix < vec4<i32>(w));
        let xv = gather_x(i32(p.x_at.x + n * p.x_at.y) + tap_plane + iy * w + ix, inside);
        let dy_base = p.dy_at.x + n * p.dy_at.y + r;
        for (var c = 0u; c < TC; c++) {
            acc[c] += dy[dy_base + min(co0 + c, p.c_out - 1u) * plane] * xv;
        }
    }

    let out_base = (p.first_split + split) * p.c_out * taps;
    for (var c = 0u; c < TC; c++) {
        let co = co0 + c;
        if (co >= p.c_out) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            if (t0 + j < taps) {
                dweight_partial[out_base + co * taps + t0 + j] = acc[c][j];
            }
        }
    }
}
