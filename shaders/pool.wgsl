// 2-D pooling on NCHW planes, PyTorch floor mode. Average pooling counts
// padded zeros (count_include_pad=True), so every window divides by kh*kw.

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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Pool;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

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
                sum += src[(plane * p.h + u32(y)) * p.w + u32(x)];
            }
        }
    }
    dst[i] = sum / f32(p.kh * p.kw);
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
    let y = i32((i / p.w) % p.h) + i32(p.pad_h);
    let x = i32(i % p.w) + i32(p.pad_w);
    // Windows oy with oy*s <= y < oy*s + k.
    let oy_first = u32(max(y - i32(p.kh) + i32(p.stride_h), 0)) / p.stride_h;
    let oy_last = min(u32(y) / p.stride_h, p.ho - 1u);
    let ox_first = u32(max(x - i32(p.kw) + i32(p.stride_w), 0)) / p.stride_w;
    let ox_last = min(u32(x) / p.stride_w, p.wo - 1u);
    var sum = 0.0;
    for (var oy = oy_first; oy <= oy_last; oy++) {
        for (var ox = ox_first; ox <= ox_last; ox++) {
            sum += src[(plane * p.ho + oy) * p.wo + ox];
        }
    }
    dst[i] = sum / f32(p.kh * p.kw);
}
