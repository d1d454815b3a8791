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
    kh: u32,
    kw: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: u32,
    pad_w: u32,
    channels: u32,
    // graph::Layout of src and dst: (offset, sample stride)
    src_at: vec2<u32>,
    dst_at: vec2<u32>,
    // Where the (contiguous) argmax tensor starts in its binding: a batch
    // chunk's first element need not start the binding.
    argmax_offset: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Pool;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(4) var<storage, read> argmax_in: array<u32>;

// Element `at` of plane `plane` (= sample * channels + channel) of a tensor
// laid out as `l`, whose planes hold `plane_len` elements.
fn plane_element(l: vec2<u32>, plane: u32, plane_len: u32, at: u32) -> u32 {
    return strided(l, p.channels * plane_len, plane * plane_len + at);
}

// The output windows (oy, ox) that cover input element (y, x) of a plane,
// as inclusive ranges: oy * stride <= y + pad < oy * stride + k.
struct Windows {
    oy_first: u32,
    oy_last: u32,
    ox_first: u32,
    ox_last: u32,
}

fn windows_covering(y_in: u32, x_in: u32) -> Windows {
    let y = i32(y_in + p.pad_h);
    let x = i32(x_in + p.pad_w);
    return Windows(
        u32(max(y - i32(p.kh) + i32(p.stride_h), 0)) / p.stride_h,
        min(u32(y) / p.stride_h, p.ho - 1u),
        u32(max(x - i32(p.kw) + i32(p.stride_w), 0)) / p.stride_w,
        min(u32(x) / p.stride_w, p.wo - 1u),
    );
}

@compute @workgroup_size(WG)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho * p.wo) {
        return;
    }
    let plane = i / (p.ho * p.wo);
    let oy = (i / p.wo) % p.ho;
    let ox = i % p.wo;
    let y0 = i32(oy * p.stride_h) - i32(p.pad_h);
    let x0 = i32(ox * p.stride_w) - i32(p.pad_w);
    var sum = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let y = y0 + i32(ky);
        if (y < 0 || y >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let x = x0 + i32(kx);
            if (x >= 0 && x < i32(p.w)) {
                sum += src[plane_element(p.src_at, plane, p.h * p.w, u32(y) * p.w + u32(x))];
            }
        }
    }
    dst[plane_element(p.dst_at, plane, p.ho * p.wo, i % (p.ho * p.wo))] = sum / f32(p.kh * p.kw);
}

// Each input element gathers dy / (kh*kw) from every window that covers it,
// so no two invocations write the same element (no atomics).
@compute @workgroup_size(WG)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let plane = i / (p.h * p.w);
    let win = windows_covering((i / p.w) % p.h, i % p.w);
    var sum = 0.0;
    for (var oy = win.oy_first; oy <= win.oy_last; oy++) {
        for (var ox = win.ox_first; ox <= win.ox_last; ox++) {
            sum += src[plane_element(p.src_at, plane, p.ho * p.wo, oy * p.wo + ox)];
        }
    }
    dst[plane_element(p.dst_at, plane, p.h * p.w, i % (p.h * p.w))] = sum / f32(p.kh * p.kw);
}

@compute @workgroup_size(WG)
fn max_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.ho * p.wo) {
        return;
    }
    let plane = i / (p.ho * p.wo);
    let y0 = i32(((i / p.wo) % p.ho) * p.stride_h) - i32(p.pad_h);
    let x0 = i32((i % p.wo) * p.stride_w) - i32(p.pad_w);
    var best = 0.0;
    var best_at = 0xffffffffu;
    for (var ky = 0u; ky < p.kh; ky++) {
        let y = y0 + i32(ky);
        if (y < 0 || y >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let x = x0 + i32(kx);
            if (x < 0 || x >= i32(p.w)) {
                continue;
            }
            let at = u32(y) * p.w + u32(x);
            let v = src[plane_element(p.src_at, plane, p.h * p.w, at)];
            // Strictly greater keeps the first maximum; NaN wins, as in PyTorch.
            if (best_at == 0xffffffffu || v > best || v != v) {
                best = v;
                best_at = at;
            }
        }
    }
    dst[plane_element(p.dst_at, plane, p.ho * p.wo, i % (p.ho * p.wo))] = best;
    argmax[p.argmax_offset + i] = best_at;
}

// dx[y, x] = sum of dy over the windows whose maximum was at (y, x).
@compute @workgroup_size(WG)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let plane = i / (p.h * p.w);
    let at = i % (p.h * p.w);
    let win = windows_covering(at / p.w, at % p.w);
    var sum = 0.0;
    for (var oy = win.oy_first; oy <= win.oy_last; oy++) {
        for (var ox = win.ox_first; ox <= win.ox_last; ox++) {
            let o = oy * p.wo + ox;
            if (argmax_in[p.argmax_offset + plane * p.ho * p.wo + o] == at) {
                sum += src[plane_element(p.src_at, plane, p.ho * p.wo, o)];
            }
        }
    }
    dst[plane_element(p.dst_at, plane, p.h * p.w, at)] = sum;
}
