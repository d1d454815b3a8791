// Input pipeline: gather a batch of u8 images by index from the dataset held
// on the GPU, scale to [0, 1] (torchvision's ToTensor) and resize bilinearly
// with align_corners=False (torchvision's Resize when upsampling).

struct Gather {
    batch: u32,
    src_h: u32,
    src_w: u32,
    dst_h: u32,
    dst_w: u32,
    scale_h: f32,
    scale_w: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Gather;
@group(0) @binding(1) var<storage, read> pixels: array<u32>; // 4 u8 pixels per word
@group(0) @binding(2) var<storage, read> dataset_labels: array<u32>;
@group(0) @binding(3) var<storage, read> indices: array<u32>;
@group(0) @binding(4) var<storage, read_write> images: array<f32>;
@group(0) @binding(5) var<storage, read_write> labels: array<u32>;

fn pixel(image: u32, y: u32, x: u32) -> f32 {
    let byte = (image * p.src_h + y) * p.src_w + x;
    let word = pixels[byte >> 2u];
    return f32((word >> ((byte & 3u) * 8u)) & 0xffu) / 255.0;
}

// PyTorch's source coordinate for an output index (area_pixel_compute_source_index).
fn source_coord(dst: u32, scale: f32) -> f32 {
    return max(scale * (f32(dst) + 0.5) - 0.5, 0.0);
}

@compute @workgroup_size(WG)
fn gather_resize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.batch) {
        labels[i] = dataset_labels[indices[i]];
    }
    let per_image = p.dst_h * p.dst_w;
    if (i >= p.batch * per_image) {
        return;
    }
    let image = indices[i / per_image];
    let y = (i % per_image) / p.dst_w;
    let x = i % p.dst_w;

    let sy = source_coord(y, p.scale_h);
    let y0 = u32(sy);
    let y1 = min(y0 + 1u, p.src_h - 1u);
    let ly = sy - f32(y0);
    let sx = source_coord(x, p.scale_w);
    let x0 = u32(sx);
    let x1 = min(x0 + 1u, p.src_w - 1u);
    let lx = sx - f32(x0);

    let top = (1.0 - lx) * pixel(image, y0, x0) + lx * pixel(image, y0, x1);
    let bottom = (1.0 - lx) * pixel(image, y1, x0) + lx * pixel(image, y1, x1);
    images[i] = (1.0 - ly) * top + ly * bottom;
}

// gather_resize at the dataset's own size, where an image is whole words:
// a word's four pixels per invocation and one vec4 store, the values
// gather_resize computes (its weights are exactly 1 and 0 there).
@group(0) @binding(6) var<storage, read_write> image_quads: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if (i < p.batch) {
        labels[i] = dataset_labels[indices[i]];
    }
    let words = p.src_h * p.src_w / 4u;
    if (i >= p.batch * words) {
        return;
    }
    let n = quotient(i, words);
    let word = pixels[indices[n] * words + (i - n * words)];
    let bytes = (vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
    image_quads[i] = vec4<f32>(bytes) / 255.0;
}
