//! `nn.AvgPool2d` (count_include_pad=True) and `nn.MaxPool2d`, floor mode,
//! forward and backward. Both share the window arithmetic in `PoolWindow`.

use super::fused::{activation_constant, GradientEpilogue, WithActivationBackward};
use super::{expect_rank, Activation, CpuTensor};
use crate::gpu::Shader;
use crate::graph::{Binding, DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
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

    /// The 1x1 window with stride 2: `x[:, :, ::2, ::2]`, the pixels a 1x1
    /// convolution with stride 2 reads.
    pub const EVEN_PIXELS: PoolWindow = PoolWindow {
        kernel: (1, 1),
        stride: (2, 2),
        padding: (0, 0),
    };

    /// Whether the `*_even_pixels` kernels take this pool of `h` x `w`
    /// planes (where the layouts are whole vec4s too): `EVEN_PIXELS` over
    /// an even number of rows, each output row whole vec4s.
    pub fn takes_even_pixels(&self, h: usize, w: usize) -> bool {
        *self == PoolWindow::EVEN_PIXELS && h.is_multiple_of(2) && w.is_multiple_of(8)
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

    /// Whether this pooling of an input shaped as in `p` is 2 x 2 windows
    /// with stride 2 that tile the input exactly (the `*_2x2` kernels).
    fn tiles_2x2(&self, p: &PoolParams) -> bool {
        self.kernel == (2, 2)
            && self.stride == (2, 2)
            && self.padding == (0, 0)
            && p.h.is_multiple_of(2)
            && p.w.is_multiple_of(2)
    }

    /// Records a window kernel for a pool whose input has `input`'s shape,
    /// where the windows tile the input and every layout suits the views
    /// the kernel binds: `entries.window_pair` over every two windows side
    /// by side (rows of whole vec4s), else `entries.window` over every
    /// window. Returns whether one took the pool (nothing is planned
    /// otherwise).
    fn record_windows(
        &self,
        ctx: &mut PlanContext,
        entries: &WindowEntries,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> Result<bool> {
        let p = self.bound_params(ctx, input, storage);
        if !self.tiles_2x2(&p) {
            return Ok(false);
        }
        let constants = [activation_constant(entries.activation)];
        let windows = (p.planes * p.ho * p.wo) as usize;
        let kernels = [
            (
                entries.window_pair,
                entries.pair_views,
                windows / 2,
                p.w.is_multiple_of(4),
            ),
            (entries.window, entries.views, windows, true),
        ];
        for (entry, views, invocations, rows_fit) in kernels {
            if !rows_fit {
                continue;
            }
            let Some(bound) = bound_as_views(ctx, storage, views) else {
                continue;
            };
            let kernel = (Shader::Pool, entry, &constants[..]);
            ctx.dispatch_with(kernel, &p, &bound, invocations)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Records `entry`, one of the `*_even_pixels` kernels, one invocation
    /// per output row, where it takes this pool of `input` (see
    /// `takes_even_pixels`); says whether it did.
    fn record_even_pixels(
        &self,
        ctx: &mut PlanContext,
        entry: &'static str,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> Result<bool> {
        let p = self.bound_params(ctx, input, storage);
        if !self.takes_even_pixels(p.h as usize, p.w as usize) {
            return Ok(false);
        }
        let Some(bound) = bound_as_views(ctx, storage, &[(1, 11), (2, 6)]) else {
            return Ok(false);
        };
        let rows = (p.planes * p.ho) as usize;
        ctx.dispatch(Shader::Pool, entry, &p, &bound, rows)?;
        Ok(true)
    }

    /// Records a window kernel where one takes the pool (`record_windows`),
    /// else `entries.element` over every block of `dst` (slot 2).
    /// `entries.activation` is the one whose backward a
    /// `*_backward_activated` entry applies.
    fn record(
        &self,
        ctx: &mut PlanContext,
        entries: &WindowEntries,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> Result<()> {
        if self.record_windows(ctx, entries, input, storage)? {
            return Ok(());
        }
        let p = self.bound_params(ctx, input, storage);
        let invocations = blocks(ctx, storage, entries.block);
        let bound = ctx.bind(storage);
        let constants = self.constants(entries.activation);
        ctx.dispatch_with(
            (Shader::Pool, entries.element, &constants),
            &p,
            &bound,
            invocations,
        )
    }

    /// `record` for a gradient, with its `quads` form (four elements per
    /// invocation, dst and act_out at slots 6 and 7) between the window
    /// kernels and the element kernel, where rows and layouts are whole
    /// vec4s.
    fn record_backward(
        &self,
        ctx: &mut PlanContext,
        (entries, quads): (&WindowEntries, &'static str),
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> Result<()> {
        let p = self.bound_params(ctx, input, storage);
        let in_quads = [p.w, p.dst_at[0], p.dst_at[1], p.act_at[0], p.act_at[1]];
        if in_quads.iter().any(|v| v % 4 != 0) {
            return self.record(ctx, entries, input, storage);
        }
        if self.record_windows(ctx, entries, input, storage)? {
            return Ok(());
        }
        let as_quads = |&(slot, t): &(u32, TensorId)| match slot {
            2 => (6, t),
            5 => (7, t),
            _ => (slot, t),
        };
        let bound = ctx.bind(&storage.iter().map(as_quads).collect::<Vec<_>>());
        let constants = self.constants(entries.activation);
        let invocations = blocks(ctx, storage, (entries.block.0, 4));
        ctx.dispatch_with((Shader::Pool, quads, &constants), &p, &bound, invocations)
    }

    /// The element kernels' override constants: the window and the activation.
    fn constants(&self, activation: Option<Activation>) -> [(&'static str, u32); 7] {
        let u = |v: usize| v as u32;
        [
            activation_constant(activation),
            ("KH", u(self.kernel.0)),
            ("KW", u(self.kernel.1)),
            ("STRIDE_H", u(self.stride.0)),
            ("STRIDE_W", u(self.stride.1)),
            ("PAD_H", u(self.padding.0)),
            ("PAD_W", u(self.padding.1)),
        ]
    }

    /// The uniform for a pool whose input has `input`'s shape, with the
    /// layouts of the tensors at their slots.
    fn bound_params(
        &self,
        ctx: &PlanContext,
        input: TensorId,
        storage: &[(u32, TensorId)],
    ) -> PoolParams {
        let mut p = self.params(&ctx.shape(input));
        for &(slot, t) in storage {
            match slot {
                1 => p.src_at = ctx.layout(t),
                2 => p.dst_at = ctx.layout(t),
                3 | 4 => p.argmax_offset = ctx.layout(t)[0],
                5 => p.act_at = ctx.layout(t),
                _ => {}
            }
        }
        p
    }
}

/// A pooling op's kernels: per element, per 2 x 2 window and per two
/// windows side by side, and the activation whose backward a gradient
/// applies; with the slots each window kernel binds the op's tensors at.
struct WindowEntries {
    element: &'static str,
    /// Rows by elements of dst per invocation of `element`; the quads
    /// kernel takes as many rows by four.
    block: (usize, usize),
    window: &'static str,
    window_pair: &'static str,
    views: &'static [(u32, u32)],
    pair_views: &'static [(u32, u32)],
    activation: Option<Activation>,
}

impl WindowEntries {
    fn forward(element: &'static str, window: &'static str, window_pair: &'static str) -> Self {
        WindowEntries {
            element,
            block: (1, 1),
            window,
            window_pair,
            views: &[(1, 8)],
            pair_views: &[(1, 11), (2, 9), (3, 12)],
            activation: None,
        }
    }

    fn backward(
        (element, window, window_pair): (&'static str, &'static str, &'static str),
        activation: Option<Activation>,
    ) -> Self {
        WindowEntries {
            element,
            block: (1, 1),
            window,
            window_pair,
            views: &[(2, 9), (5, 10)],
            pair_views: &[(1, 8), (2, 6), (4, 13), (5, 7)],
            activation,
        }
    }

    /// These entries with `element` taking blocks of `rows` by `elements`.
    fn in_blocks(self, rows: usize, elements: usize) -> Self {
        WindowEntries {
            block: (rows, elements),
            ..self
        }
    }
}

/// Blocks of `rows` by `elements` that cover dst (slot 2) plane by plane,
/// cut short at each plane's last rows and each row's end.
fn blocks(
    ctx: &PlanContext,
    storage: &[(u32, TensorId)],
    (rows, elements): (usize, usize),
) -> usize {
    let (_, dst) = storage.iter().find(|&&(slot, _)| slot == 2).expect("dst");
    let shape = ctx.shape(*dst);
    shape[0] * shape[1] * shape[2].div_ceil(rows) * shape[3].div_ceil(elements)
}

/// `storage` bound with each slot that `views` names moved to its view's
/// slot; None unless every such tensor's layout starts on whole views:
/// vec4s at slots 6, 7 and 11, pairs at the others (vec2s, argmax's u32
/// pairs).
fn bound_as_views(
    ctx: &PlanContext,
    storage: &[(u32, TensorId)],
    views: &[(u32, u32)],
) -> Option<Vec<(u32, Binding)>> {
    let view_of = |slot: u32| {
        views
            .iter()
            .find(|&&(from, _)| from == slot)
            .map(|&(_, to)| to)
    };
    let mut moved = Vec::new();
    for &(slot, t) in storage {
        let slot = match view_of(slot) {
            Some(view) => {
                let width = if matches!(view, 6 | 7 | 11) { 4 } else { 2 };
                if !ctx.layout(t).iter().all(|v| v.is_multiple_of(width)) {
                    return None;
                }
                view
            }
            None => slot,
        };
        moved.push((slot, t));
    }
    Some(ctx.bind(&moved))
}

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
        let entry = "avg_forward_even_pixels";
        if self.0.record_even_pixels(ctx, entry, inputs[0], &storage)? {
            return Ok(());
        }
        let entries =
            WindowEntries::forward("avg_forward", "avg_forward_2x2", "avg_forward_2x2_pairs");
        self.0.record(ctx, &entries, inputs[0], &storage)
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
        let (pool, entry) = (self.pool.0, "avg_backward_even_pixels");
        if pool.record_even_pixels(ctx, entry, outputs[0], &storage)? {
            return Ok(());
        }
        let entries = WindowEntries::backward(
            ("avg_backward", "avg_backward_2x2", "avg_backward_2x2_pairs"),
            None,
        );
        let kernels = (&entries, "avg_backward_quads");
        self.pool
            .0
            .record_backward(ctx, kernels, outputs[0], &storage)
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        WithActivationBackward::op(self.clone(), activation)
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
        let entries = WindowEntries::backward(
            (
                "avg_backward_activated",
                "avg_backward_activated_2x2",
                "avg_backward_activated_2x2_pairs",
            ),
            Some(activation),
        );
        let kernels = (&entries, "avg_backward_activated_quads");
        self.pool
            .0
            .record_backward(ctx, kernels, outputs[0], &storage)
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
        let entries =
            WindowEntries::forward("max_forward", "max_forward_2x2", "max_forward_2x2_pairs");
        self.0
            .record(ctx, &entries.in_blocks(1, 4), inputs[0], &storage)
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
        let entries = WindowEntries::backward(
            ("max_backward", "max_backward_2x2", "max_backward_2x2_pairs"),
            None,
        )
        .in_blocks(2, 4);
        let kernels = (&entries, "max_backward_quads");
        self.pool
            .0
            .record_backward(ctx, kernels, outputs[0], &storage)
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        WithActivationBackward::op(self.clone(), activation)
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
        let entries = WindowEntries::backward(
            (
                "max_backward_activated",
                "max_backward_activated_2x2",
                "max_backward_activated_2x2_pairs",
            ),
            Some(activation),
        )
        .in_blocks(2, 4);
        let kernels = (&entries, "max_backward_activated_quads");
        self.pool
            .0
            .record_backward(ctx, kernels, outputs[0], &storage)
    }
}
