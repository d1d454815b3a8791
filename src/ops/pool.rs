//! `nn.AvgPool2d` (count_include_pad=True) and `nn.MaxPool2d`, floor mode,
//! forward and backward. Both share the window arithmetic in `PoolWindow`.

use super::fused::{activation_constant, GradientEpilogue, WithActivationBackward};
use super::{expect_rank, Activation, CpuTensor};
use crate::gpu::Shader;
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::rc::Rc;

/// Kernel, stride and padding of a pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolWindow {
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
    channels: u32,
    src_at: [u32; 2],
    dst_at: [u32; 2],
    argmax_offset: u32,
    _pad: u32,
    act_at: [u32; 2],
}

impl PoolWindow {
    /// A square `kernel` window moving by `stride`, no padding.
    pub fn new(kernel: usize, stride: usize) -> PoolWindow {
        PoolWindow {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (0, 0),
        }
    }

    pub fn padding(self, padding: usize) -> PoolWindow {
        PoolWindow {
            padding: (padding, padding),
            ..self
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

    /// `[n, c, ho, wo]` for an NCHW input shape.
    pub fn output_shape(&self, x: &[usize]) -> Result<Shape> {
        let (ho, wo) = self.output_size(x[2], x[3])?;
        Ok(vec![x[0], x[1], ho, wo])
    }

    fn infer(&self, x: &Tensor, what: &str) -> Result<Shape> {
        expect_rank(x, 4, what)?;
        self.output_shape(&x.shape)
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
            channels: u(x[1]),
            src_at: [0, 0],
            dst_at: [0, 0],
            argmax_offset: 0,
            _pad: 0,
            act_at: [0, 0],
        }
    }

    fn describe(&self, kind: &str) -> String {
        format!(
            "{kind}_pool2d {:?} stride {:?} padding {:?}",
            self.kernel, self.stride, self.padding
        )
    }

    /// Calls `f(input index, output index)` for every input element inside
    /// every window, windows in output order, elements row by row.
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

    /// Whether the `*_2x2` kernels take this pooling of an input shaped as
    /// in `p`: 2 x 2 windows with stride 2 that tile the input exactly,
    /// and the tensors they bind as vec2s (at `paired`) on even elements.
    fn tiles_2x2(&self, p: &PoolParams, paired: &[[u32; 2]]) -> bool {
        self.kernel == (2, 2)
            && self.stride == (2, 2)
            && self.padding == (0, 0)
            && p.h.is_multiple_of(2)
            && p.w.is_multiple_of(2)
            && paired.iter().flatten().all(|v| v.is_multiple_of(2))
    }

    /// Records `entry` over every element of `dst` (slot 2), for a pool
    /// whose input has `input`'s shape, or where `tiles_2x2` allows
    /// `window_entry` over every window, with the bindings `pairs` names
    /// moved to its vec2 slots; `activation` is the one whose backward a
    /// `*_backward_activated` entry applies.
    fn record(
        &self,
        ctx: &mut PlanContext,
        (entry, window_entry, activation): (&'static str, &'static str, Option<Activation>),
        (input, pairs): (TensorId, &[(u32, u32)]),
        storage: &[(u32, TensorId)],
    ) -> Result<()> {
        let (p, len) = self.bound_params(ctx, input, storage);
        let constants = [activation_constant(activation)];
        let pair_slot = |slot: u32| pairs.iter().find(|&&(from, _)| from == slot);
        let paired: Vec<[u32; 2]> = (storage.iter())
            .filter(|&&(slot, _)| pair_slot(slot).is_some())
            .map(|&(_, t)| ctx.layout(t))
            .collect();
        if self.tiles_2x2(&p, &paired) {
            let as_pairs =
                |&(slot, t): &(u32, TensorId)| (pair_slot(slot).map_or(slot, |&(_, to)| to), t);
            let bound = ctx.bind(&storage.iter().map(as_pairs).collect::<Vec<_>>());
            let windows = (p.planes * p.ho * p.wo) as usize;
            let kernel = (Shader::Pool, window_entry, &constants[..]);
            return ctx.dispatch_with(kernel, &p, &bound, windows);
        }
        let bound = ctx.bind(storage);
        ctx.dispatch_with((Shader::Pool, entry, &constants), &p, &bound, len)
    }

    /// `record` for a gradient: its `window_entry` where `tiles_2x2`
    /// allows, else its `quads` form (four elements per invocation, dst and
    /// act_out at slots 6 and 7) where rows and layouts are whole vec4s,
    /// else `entry`.
    fn record_backward(
        &self,
        ctx: &mut PlanContext,
        (entry, quads, window_entry, activation): Entries,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> Result<()> {
        let (p, len) = self.bound_params(ctx, input, storage);
        let kernel = (entry, window_entry, activation);
        let in_quads = [p.w, p.dst_at[0], p.dst_at[1], p.act_at[0], p.act_at[1]];
        if self.tiles_2x2(&p, &[p.dst_at, p.act_at]) || in_quads.iter().any(|v| v % 4 != 0) {
            return self.record(ctx, kernel, (input, &GRADIENT_PAIRS), storage);
        }
        let as_quads = |&(slot, t): &(u32, TensorId)| match slot {
            2 => (6, t),
            5 => (7, t),
            _ => (slot, t),
        };
        let bound = ctx.bind(&storage.iter().map(as_quads).collect::<Vec<_>>());
        let constants = [activation_constant(activation)];
        ctx.dispatch_with((Shader::Pool, quads, &constants), &p, &bound, len / 4)
    }

    /// The uniform for a pool whose input has `input`'s shape, with the
    /// layouts of the tensors at their slots; and the elements of dst.
    fn bound_params(
        &self,
        ctx: &PlanContext,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> (PoolParams, usize) {
        let mut p = self.params(&ctx.shape(input));
        let mut len = 0;
        for &(slot, t) in storage {
            match slot {
                1 => p.src_at = ctx.layout(t),
                2 => (p.dst_at, len) = (ctx.layout(t), ctx.len(t)),
                3 | 4 => p.argmax_offset = ctx.layout(t)[0],
                5 => p.act_at = ctx.layout(t),
                _ => {}
            }
        }
        (p, len)
    }
}

/// A pooling gradient's kernels: per element, four elements at a time,
/// per 2 x 2 window; and the activation whose backward it applies.
type Entries = (&'static str, &'static str, &'static str, Option<Activation>);

/// Where the `*_2x2` kernels bind as vec2s what the others bind as floats:
/// the forward pass's input, the gradients' output and activation output.
const FORWARD_PAIRS: [(u32, u32); 1] = [(1, 8)];
const GRADIENT_PAIRS: [(u32, u32); 2] = [(2, 9), (5, 10)];

/// `nn.AvgPool2d`: padded zeros count, so every window divides by kh*kw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool2d(pub PoolWindow);

impl AvgPool2d {
    /// `nn.AvgPool2d(kernel_size=k, stride=s)`.
    pub fn new(kernel: usize, stride: usize) -> AvgPool2d {
        AvgPool2d(PoolWindow::new(kernel, stride))
    }

    fn area(&self) -> f32 {
        (self.0.kernel.0 * self.0.kernel.1) as f32
    }

    pub fn cpu_forward(&self, x: &CpuTensor) -> CpuTensor {
        let mut y = CpuTensor::zeros(&self.0.output_shape(&x.shape).expect("valid shape"));
        self.0
            .for_each_pair(&x.shape, |i, o| y.data[o] += x.data[i] / self.area());
        y
    }

    pub fn cpu_backward(&self, x_shape: &[usize], dy: &CpuTensor) -> CpuTensor {
        let mut dx = CpuTensor::zeros(x_shape);
        self.0
            .for_each_pair(x_shape, |i, o| dx.data[i] += dy.data[o] / self.area());
        dx
    }
}

impl Op for AvgPool2d {
    fn describe(&self) -> String {
        self.0.describe("avg")
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(
            self.0.infer(inputs[0], "avg_pool2d input")?,
            DType::F32,
        )])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let storage = [(1, inputs[0]), (2, outputs[0])];
        let kernel = ("avg_forward", "avg_forward_2x2", None);
        self.0
            .record(ctx, kernel, (inputs[0], &FORWARD_PAIRS), &storage)
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
#[derive(Clone, Debug)]
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

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let storage = [(1, inputs[0]), (2, outputs[0])];
        let kernel = (
            "avg_backward",
            "avg_backward_quads",
            "avg_backward_2x2",
            None,
        );
        self.pool
            .0
            .record_backward(ctx, kernel, outputs[0], &storage)
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(WithActivationBackward::new(
            self.clone(),
            activation,
        )))
    }
}

impl GradientEpilogue for AvgPool2dBackward {
    fn plan_activation_backward(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Activation,
    ) -> Result<()> {
        let storage = [(1, inputs[0]), (5, inputs[1]), (2, outputs[0])];
        let kernel = (
            "avg_backward_activated",
            "avg_backward_activated_quads",
            "avg_backward_activated_2x2",
            Some(activation),
        );
        self.pool
            .0
            .record_backward(ctx, kernel, outputs[0], &storage)
    }
}

/// `nn.MaxPool2d`: outputs the maxima and, as PyTorch's `return_indices`,
/// where in its plane each maximum was (u32), which the backward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d(pub PoolWindow);

impl MaxPool2d {
    /// CPU reference: (y, flat in-plane index of each window's first maximum).
    pub fn cpu_forward(&self, x: &CpuTensor) -> (CpuTensor, Vec<u32>) {
        let mut y = CpuTensor::zeros(&self.0.output_shape(&x.shape).expect("valid shape"));
        let mut argmax = vec![u32::MAX; y.data.len()];
        let plane = x.shape[2] * x.shape[3];
        self.0.for_each_pair(&x.shape, |i, o| {
            let v = x.data[i];
            if argmax[o] == u32::MAX || v > y.data[o] || v.is_nan() {
                y.data[o] = v;
                argmax[o] = (i % plane) as u32;
            }
        });
        (y, argmax)
    }

    pub fn cpu_backward(&self, x_shape: &[usize], dy: &CpuTensor, argmax: &[u32]) -> CpuTensor {
        let mut dx = CpuTensor::zeros(x_shape);
        let plane = x_shape[2] * x_shape[3];
        let out_plane = dy.shape[2] * dy.shape[3];
        for (o, (&g, &at)) in dy.data.iter().zip(argmax).enumerate() {
            dx.data[(o / out_plane) * plane + at as usize] += g;
        }
        dx
    }
}

impl Op for MaxPool2d {
    fn describe(&self) -> String {
        self.0.describe("max")
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let shape = self.0.infer(inputs[0], "max_pool2d input")?;
        Ok(vec![(shape.clone(), DType::F32), (shape, DType::U32)])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let storage = [(1, inputs[0]), (2, outputs[0]), (3, outputs[1])];
        let kernel = ("max_forward", "max_forward_2x2", None);
        self.0
            .record(ctx, kernel, (inputs[0], &FORWARD_PAIRS), &storage)
    }

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("only the pooled values carry a gradient");
        let back = MaxPool2dBackward {
            pool: *self,
            input: g.shape(inputs[0]).to_vec(),
        };
        Ok(vec![Some(g.apply1(back, &[dy, outputs[1]])?)])
    }
}

/// dx: every input element gathers dy from the windows whose maximum it was.
#[derive(Clone, Debug)]
pub struct MaxPool2dBackward {
    pub pool: MaxPool2d,
    pub input: Shape,
}

impl Op for MaxPool2dBackward {
    fn describe(&self) -> String {
        format!("{} backward", self.pool.describe())
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(self.input.clone(), DType::F32)])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let storage = [(1, inputs[0]), (4, inputs[1]), (2, outputs[0])];
        let kernel = (
            "max_backward",
            "max_backward_quads",
            "max_backward_2x2",
            None,
        );
        self.pool
            .0
            .record_backward(ctx, kernel, outputs[0], &storage)
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(WithActivationBackward::new(
            self.clone(),
            activation,
        )))
    }
}

impl GradientEpilogue for MaxPool2dBackward {
    fn plan_activation_backward(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Activation,
    ) -> Result<()> {
        let storage = [
            (1, inputs[0]),
            (4, inputs[1]),
            (5, inputs[2]),
            (2, outputs[0]),
        ];
        let kernel = (
            "max_backward_activated",
            "max_backward_activated_quads",
            "max_backward_activated_2x2",
            Some(activation),
        );
        self.pool
            .0
            .record_backward(ctx, kernel, outputs[0], &storage)
    }
}
