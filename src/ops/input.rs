//! The input pipeline on the GPU: gather a batch by index from the u8
//! dataset, scale to [0, 1] and resize bilinearly (align_corners=False).

use super::CpuTensor;
use crate::gpu::Shader;
use crate::graph::{DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GatherParams {
    batch: u32,
    src_h: u32,
    src_w: u32,
    dst_h: u32,
    dst_w: u32,
    scale_h: f32,
    scale_w: f32,
    _pad: u32,
}

/// Inputs: dataset pixels `[count, h, w]` (u8), dataset labels `[count]`
/// (u32), batch indices `[batch]` (u32). Outputs: images `[batch, 1, size,
/// size]` (f32) and their labels `[batch]` (u32).
#[derive(Debug)]
pub struct GatherResize {
    pub size: usize,
}

/// PyTorch's source coordinate and the two neighbours' weights for output
/// index `dst` (upsample_bilinear2d, align_corners=False).
fn taps(dst: usize, src_len: usize, dst_len: usize) -> (usize, usize, f32) {
    let scale = src_len as f32 / dst_len as f32;
    let s = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = s as usize;
    (i0, (i0 + 1).min(src_len - 1), s - i0 as f32)
}

impl GatherResize {
    /// CPU reference: `F.interpolate(u8 / 255, size, mode="bilinear")` for one image.
    pub fn cpu(&self, image: &[u8], h: usize, w: usize) -> CpuTensor {
        let n = self.size;
        let px = |y: usize, x: usize| image[y * w + x] as f32 / 255.0;
        let mut out = CpuTensor::zeros(&[1, 1, n, n]);
        for y in 0..n {
            let (y0, y1, ly) = taps(y, h, n);
            for x in 0..n {
                let (x0, x1, lx) = taps(x, w, n);
                let top = (1.0 - lx) * px(y0, x0) + lx * px(y0, x1);
                let bottom = (1.0 - lx) * px(y1, x0) + lx * px(y1, x1);
                out.data[y * n + x] = (1.0 - ly) * top + ly * bottom;
            }
        }
        out
    }
}

impl Op for GatherResize {
    fn describe(&self) -> String {
        format!("gather and resize to {0}x{0}", self.size)
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let [pixels, labels, indices] = inputs else {
            bail!("gather takes pixels, labels and indices")
        };
        if pixels.dtype != DType::U8 || pixels.shape.len() != 3 || labels.shape != [pixels.shape[0]]
        {
            bail!("dataset must be u8 [count, h, w] with [count] labels");
        }
        let batch = indices.shape[0];
        Ok(vec![
            (vec![batch, 1, self.size, self.size], DType::F32),
            (vec![batch], DType::U32),
        ])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let src = ctx.shape(inputs[0]);
        let batch = ctx.shape(inputs[2])[0];
        let p = GatherParams {
            batch: batch as u32,
            src_h: src[1] as u32,
            src_w: src[2] as u32,
            dst_h: self.size as u32,
            dst_w: self.size as u32,
            scale_h: src[1] as f32 / self.size as f32,
            scale_w: src[2] as f32 / self.size as f32,
            _pad: 0,
        };
        // Inputs then outputs, in binding slots 1, 2, ...
        let mut slots: Vec<(u32, TensorId)> =
            (1..).zip(inputs.iter().chain(outputs).copied()).collect();
        let pixels = self.size * self.size;
        let same_size = src[1..] == [self.size, self.size];
        if same_size && pixels.is_multiple_of(4) {
            slots[3].0 = 6;
            let storage = ctx.bind(&slots);
            let invocations = batch.max(batch * pixels / 4);
            return ctx.dispatch(Shader::Data, "gather", &p, &storage, invocations);
        }
        let storage = ctx.bind(&slots);
        ctx.dispatch(Shader::Data, "gather_resize", &p, &storage, batch * pixels)
    }
}
