// 2-D convolution (PyTorch Conv2d, NCHW, weight [c_out, c_in, kh, kw]) as
// implicit GEMMs: no im2col matrix is ever materialised; each invocation
// gathers its operands straight from the tensors and keeps a TC x TP tile of
// results in registers.
//
//   forward          y[n, co, oy, ox]  = bias[co] + sum_{ci,ky,kx} w[co, ci, ky, kx] x[n, ci, oy*s-p+ky, ox*s-p+kx]
//   backward_data    dx[n, ci, iy, ix] = sum_{co,ky,kx} w[co, ci, ky, kx] dy[n, co, (iy+p-ky)/s, (ix+p-kx)/s]
//   backward_filter  dw[co, ci, ky, kx] = sum_{n,oy,ox} dy[n, co, oy, ox] x[n, ci, oy*s-p+ky, ox*s-p+kx]
//
// backward_filter sums over batch and positions, a long K for a small output,
// so it is split: each split writes partial sums that reduce.wgsl adds up.

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
    _pad: u32,
}

const TC: u32 = 4u; // channels per invocation
const TP: u32 = 4u; // pixels (or filter taps) per invocation

@group(0) @binding(0) var<uniform> p: Conv;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read_write> dweight_partial: array<f32>;

// x[n, c, iy, ix], or 0 in the padding.
fn x_at(image_base: u32, c: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[image_base + (c * p.h + u32(iy)) * p.w + u32(ix)];
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    let plane = p.ho * p.wo;
    let pixels = p.batch * plane;
    let pixel_tiles = (pixels + TP - 1u) / TP;
    if (id >= pixel_tiles * ((p.c_out + TC - 1u) / TC)) {
        return;
    }
    let co0 = (id / pixel_tiles) * TC;
    let q0 = (id % pixel_tiles) * TP;

    var image_base: array<u32, TP>;
    var iy0: array<i32, TP>;
    var ix0: array<i32, TP>;
    for (var j = 0u; j < TP; j++) {
        let q = min(q0 + j, pixels - 1u);
        let r = q % plane;
        image_base[j] = (q / plane) * p.c_in * p.h * p.w;
        iy0[j] = i32((r / p.wo) * p.stride_h) - i32(p.pad_h);
        ix0[j] = i32((r % p.wo) * p.stride_w) - i32(p.pad_w);
    }
    var w_base: array<u32, TC>;
    let taps = p.c_in * p.kh * p.kw;
    for (var c = 0u; c < TC; c++) {
        w_base[c] = min(co0 + c, p.c_out - 1u) * taps;
    }

    var acc: array<vec4<f32>, TC>;
    var tap = 0u;
    for (var ci = 0u; ci < p.c_in; ci++) {
        for (var ky = 0u; ky < p.kh; ky++) {
            for (var kx = 0u; kx < p.kw; kx++) {
                var xv: vec4<f32>;
                for (var j = 0u; j < TP; j++) {
                    xv[j] = x_at(image_base[j], ci, iy0[j] + i32(ky), ix0[j] + i32(kx));
                }
                for (var c = 0u; c < TC; c++) {
                    acc[c] += weight[w_base[c] + tap] * xv;
                }
                tap++;
            }
        }
    }

    for (var c = 0u; c < TC; c++) {
        let co = co0 + c;
        if (co >= p.c_out) {
            break;
        }
        for (var j = 0u; j < TP; j++) {
            let q = q0 + j;
            if (q < pixels) {
                y[((q / plane) * p.c_out + co) * plane + q % plane] = acc[c][j] + bias[co];
            }
        }
    }
}

// dy[n, co, oy, ox] for the output position that input (iy, ix) meets through
// tap (ky, kx), or 0 when no output position does (stride gaps, borders).
fn dy_at(image_base: u32, co: u32, ty: i32, tx: i32) -> f32 {
    if (ty < 0 || tx < 0) {
        return 0.0;
    }
    let oy = u32(ty) / p.stride_h;
    let ox = u32(tx) / p.stride_w;
    if (oy * p.stride_h != u32(ty) || ox * p.stride_w != u32(tx) || oy >= p.ho || ox >= p.wo) {
        return 0.0;
    }
    return dy[image_base + (co * p.ho + oy) * p.wo + ox];
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    let plane = p.h * p.w;
    let pixels = p.batch * plane;
    let pixel_tiles = (pixels + TP - 1u) / TP;
    if (id >= pixel_tiles * ((p.c_in + TC - 1u) / TC)) {
        return;
    }
    let ci0 = (id / pixel_tiles) * TC;
    let q0 = (id % pixel_tiles) * TP;

    var image_base: array<u32, TP>;
    var ty0: array<i32, TP>;
    var tx0: array<i32, TP>;
    for (var j = 0u; j < TP; j++) {
        let q = min(q0 + j, pixels - 1u);
        let r = q % plane;
        image_base[j] = (q / plane) * p.c_out * p.ho * p.wo;
        ty0[j] = i32(r / p.w + p.pad_h);
        tx0[j] = i32(r % p.w + p.pad_w);
    }
    let taps = p.kh * p.kw;
    var w_ci: array<u32, TC>;
    for (var c = 0u; c < TC; c++) {
        w_ci[c] = min(ci0 + c, p.c_in - 1u) * taps;
    }

    var acc: array<vec4<f32>, TC>;
    for (var co = 0u; co < p.c_out; co++) {
        let w_co = co * p.c_in * taps;
        for (var ky = 0u; ky < p.kh; ky++) {
            for (var kx = 0u; kx < p.kw; kx++) {
                var dv: vec4<f32>;
                for (var j = 0u; j < TP; j++) {
                    dv[j] = dy_at(image_base[j], co, ty0[j] - i32(ky), tx0[j] - i32(kx));
                }
                let tap = ky * p.kw + kx;
                for (var c = 0u; c < TC; c++) {
                    acc[c] += weight[w_co + w_ci[c] + tap] * dv;
                }
            }
        }
    }

    for (var c = 0u; c < TC; c++) {
        let ci = ci0 + c;
        if (ci >= p.c_in) {
            break;
        }
        for (var j = 0u; j < TP; j++) {
            let q = q0 + j;
            if (q < pixels) {
                dx[((q / plane) * p.c_in + ci) * plane + q % plane] = acc[c][j];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn backward_filter(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_index(gid, nwg);
    let taps = p.c_in * p.kh * p.kw;
    let tap_tiles = (taps + TP - 1u) / TP;
    let tiles = tap_tiles * ((p.c_out + TC - 1u) / TC);
    if (id >= tiles * p.splits) {
        return;
    }
    let split = id / tiles;
    let tile = id % tiles;
    let co0 = (tile / tap_tiles) * TC;
    let tap0 = (tile % tap_tiles) * TP;

    // Filter tap j of this tile: its input channel and offsets.
    var tap_c: array<u32, TP>;
    var tap_y: array<i32, TP>;
    var tap_x: array<i32, TP>;
    for (var j = 0u; j < TP; j++) {
        let t = min(tap0 + j, taps - 1u);
        tap_c[j] = t / (p.kh * p.kw);
        tap_y[j] = i32((t / p.kw) % p.kh) - i32(p.pad_h);
        tap_x[j] = i32(t % p.kw) - i32(p.pad_w);
    }
    var co: array<u32, TC>;
    for (var c = 0u; c < TC; c++) {
        co[c] = min(co0 + c, p.c_out - 1u);
    }

    let plane = p.ho * p.wo;
    let first = split * p.chunk;
    let last = min(first + p.chunk, p.batch * plane);
    var acc: array<vec4<f32>, TC>;
    for (var q = first; q < last; q++) {
        let n = q / plane;
        let r = q % plane;
        let oy = r / p.wo;
        let ox = r % p.wo;
        let x_base = n * p.c_in * p.h * p.w;
        let iy = i32(oy * p.stride_h);
        let ix = i32(ox * p.stride_w);
        var xv: vec4<f32>;
        for (var j = 0u; j < TP; j++) {
            xv[j] = x_at(x_base, tap_c[j], iy + tap_y[j], ix + tap_x[j]);
        }
        let dy_base = n * p.c_out * plane + r;
        for (var c = 0u; c < TC; c++) {
            acc[c] += dy[dy_base + co[c] * plane] * xv;
        }
    }

    let out_base = split * p.c_out * taps;
    for (var c = 0u; c < TC; c++) {
        if (co0 + c >= p.c_out) {
            break;
        }
        for (var j = 0u; j < TP; j++) {
            if (tap0 + j < taps) {
                dweight_partial[out_base + (co0 + c) * taps + tap0 + j] = acc[c][j];
            }
        }
    }
}
