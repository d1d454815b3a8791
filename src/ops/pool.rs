//! `nn.AvgPool2d` (floor mode, count_include_pad=True), forward and backward.

use super::{expect_rank, CpuTensor};
use crate::gpu::Shader;
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PoolParams {
    planes: u32,
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

impl AvgPool2d {
    /// `nn.AvgPool2d(kernel_size=k, stride=s)`, no padding.
    pub fn new(kernel: usize, stride: usize) -> AvgPool2d {
        AvgPool2d {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (0, 0),
        }
    }

    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        if 2 * ph > kh || 2 * pw > kw {
            bail!("pool padding {ph}x{pw} must be at most half the kernel {kh}x{kw}");
        }
        if h + 2 * ph < kh || w + 2 * pw < kw {
            bail!("a {kh}x{kw} pooling window does not fit a {h}x{w} input");
        }
        Ok((
            (h + 2 * ph - kh) / self.stride.0 + 1,
            (w + 2 * pw - kw) / self.stride.1 + 1,
        ))
    }

    fn params(&self, x: &[usize]) -> PoolParams {
        let (ho, wo) = self
            .output_size(x[2], x[3])
            .expect("checked when the node was added");
        let u = |v: usize| v as u32;
        PoolParams {
            planes: u(x[0] * x[1]),
            h: u(x[2]),
            w: u(x[3]),
            ho: u(ho),
            wo: u(wo),
            kh: u(self.kernel.0),
            kw: u(self.kernel.1),
            stride_h: u(self.stride.0),
            stride_w: u(self.stride.1),
            pad_h: u(self.padding.0),
            pad_w: u(self.padding.1),
            _pad: 0,
        }
    }

    /// Calls `f(input index, output index)` for every (input, window) pair
    /// inside the input.
    fn for_each_pair(&self, x: &[usize], mut f: impl FnMut(usize, usize)) {
        let p = self.params(x);
        let (h, w, ho, wo) = (p.h as usize, p.w as usize, p.ho as usize, p.wo as usize);
        for plane in 0..p.planes as usize {
            for oy in 0..ho {
                for ox in 0..wo {
                    for ky in 0..self.kernel.0 {
                        for kx in 0..self.kernel.1 {
                            let iy = (oy * self.stride.0 + ky) as isize - self.padding.0 as isize;
                            let ix = (ox * self.stride.1 + kx) as isize - self.padding.1 as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                f(
                                    (plane * h + iy as usize) * w + ix as usize,
                                    (plane * ho + oy) * wo + ox,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn cpu_forward(&self, x: &CpuTensor) -> CpuTensor {
        let p = self.params(&x.shape);
        let mut y = CpuTensor::zeros(&[x.shape[0], x.shape[1], p.ho as usize, p.wo as usize]);
        let area = (self.kernel.0 * self.kernel.1) as f32;
        self.for_each_pair(&x.shape, |i, o| y.data[o] += x.data[i] / area);
        y
    }

    pub fn cpu_backward(&self, x_shape: &[usize], dy: &CpuTensor) -> CpuTensor {
        let mut dx = CpuTensor::zeros(x_shape);
        let area = (self.kernel.0 * self.kernel.1) as f32;
        self.for_each_pair(x_shape, |i, o| dx.data[i] += dy.data[o] / area);
        dx
    }
}

impl Op for AvgPool2d {
    fn describe(&self) -> String {
        format!(
            "avg_pool2d {:?} stride {:?} padding {:?}",
            self.kernel, self.stride, self.padding
        )
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let x = inputs[0];
        expect_rank(x, 4, "avg_pool2d input")?;
        let (ho, wo) = self.output_size(x.shape[2], x.shape[3])?;
        Ok(vec![(vec![x.shape[0], x.shape[1], ho, wo], DType::F32)])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let p = self.params(ctx.shape(inputs[0]));
        let (x, y) = (
            ctx.binding(inputs[0]).clone(),
            ctx.binding(outputs[0]).clone(),
        );
        let len = ctx.graph.tensor(outputs[0]).len();
        ctx.dispatch(Shader::Pool, "avg_forward", &p, &[(1, &x), (2, &y)], len)
    }

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        let back = AvgPool2dBackward {
            pool: *self,
            input: g.shape(inputs[0]).to_vec(),
        };
        Ok(vec![Some(g.apply1(back, &[dy])?)])
    }
}

/// dx: every input element gathers dy / area from the windows covering it.
#[derive(Debug)]
pub struct AvgPool2dBackward {
    pub pool: AvgPool2d,
    pub input: Shape,
}

impl Op for AvgPool2dBackward {
    fn describe(&self) -> String {
        format!("{} backward", self.pool.describe())
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(self.input.clone(), DType::F32)])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let p = self.pool.params(&self.input);
        let (dy, dx) = (
            ctx.binding(inputs[0]).clone(),
            ctx.binding(outputs[0]).clone(),
        );
        let len = ctx.graph.tensor(outputs[0]).len();
        ctx.dispatch(Shader::Pool, "avg_backward", &p, &[(1, &dy), (2, &dx)], len)
    }
}
