//! 2-D convolution (`nn.Conv2d`): NCHW input, weight `[c_out, c_in, kh, kw]`,
//! bias `[c_out]`. Forward, data gradient and filter gradient are each an
//! implicit GEMM: in `shaders/gemm_blocked.wgsl` on CPU adapters, in
//! `shaders/conv2d.wgsl` elsewhere (see `GemmKernel`); the bias gradient is
//! a channel sum.

use super::blocked::{self, BlockedParams, PackParams, RowConv, TapWindows};
use super::fused::{
    activation_constant, Activated, Epilogue, GradientEpilogue, WithActivationBackward,
};
use super::pool::{AvgPool2d, PoolWindow};
use super::reduce::{chunked_splits, sum_splits, ReduceParams, MAX_LOOP_TRIPS};
use super::{eltwise, expect_rank, Activation, ChannelSum, CpuTensor};
use crate::gpu::{GemmKernel, Shader};
use crate::graph::{Binding, DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::rc::Rc;

/// Pixels (or filter taps) per invocation: the vec4 lanes of the shader.
const PIXELS_PER_INVOCATION: usize = 4;

/// Channels per invocation (the shader's TC, at most its MAX_TC of 16): all
/// of them when there are few (LeNet's 6 and 16), so each gathered input is
/// reused for every channel, else 16-channel register tiles.
fn channel_tile(channels: usize) -> usize {
    channels.clamp(1, 16)
}

fn kernel(entry: &'static str, tile: usize) -> (Shader, &'static str, [(&'static str, u32); 1]) {
    (Shader::Conv2d, entry, [("TC", tile as u32)])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvParams {
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
    splits: u32,
    chunk: u32,
    first_split: u32,
    x_at: [u32; 2],
    y_at: [u32; 2],
    dy_at: [u32; 2],
    dx_at: [u32; 2],
}

impl Conv2d {
    /// PyTorch's output size: floor((in + 2 pad - kernel) / stride) + 1.
    pub fn output_size(
        &self,
        input: (usize, usize),
        kernel: (usize, usize),
    ) -> Result<(usize, usize)> {
        let (h, w) = input;
        let (kh, kw) = kernel;
        let (ph, pw) = self.padding;
        if h + 2 * ph < kh || w + 2 * pw < kw {
            bail!("a {kh}x{kw} kernel does not fit a {h}x{w} input with padding {ph}x{pw}");
        }
        Ok((
            (h + 2 * ph - kh) / self.stride.0 + 1,
            (w + 2 * pw - kw) / self.stride.1 + 1,
        ))
    }

    /// A 1x1 convolution with stride 2 and no padding (ResNet's shortcuts)
    /// reads only x's even pixels: for input `x` and weight `weight`
    /// shapes where `PoolWindow::takes_even_pixels`, the pool that picks
    /// them (`x[:, :, ::2, ::2]`, `nn.AvgPool2d(1, 2)`) and the pointwise
    /// convolution over them, which give the same result. The forward
    /// pass and the filter gradient then read the pixels picked once four
    /// at a time, where this convolution gathers them a float at a time in
    /// each (ResNet's first shortcut at batch 128 on lavapipe: forward
    /// 14.7-16.1 -> 11.9-12.0 ms and the pool's 3.4, filter gradient
    /// 14.1-14.8 -> 11.5-11.7, data gradient 14.2-14.4 -> 10.5-11.0 and
    /// the pool's 3.7-3.9).
    pub fn on_even_pixels(&self, x: &[usize], weight: &[usize]) -> Option<(AvgPool2d, Conv2d)> {
        let pointwise = Conv2d {
            stride: (1, 1),
            padding: (0, 0),
        };
        let shortcut = Conv2d {
            stride: (2, 2),
            ..pointwise
        };
        let picks = PoolWindow::EVEN_PIXELS.takes_even_pixels(x[2], x[3]);
        (*self == shortcut && weight[2..] == [1, 1] && picks)
            .then_some((AvgPool2d(PoolWindow::EVEN_PIXELS), pointwise))
    }

    /// Uniform parameters for input `[n, c_in, h, w]` and weight `[c_out, c_in, kh, kw]`.
    fn params(&self, x: &[usize], weight: &[usize]) -> ConvParams {
        let (ho, wo) = self
            .output_size((x[2], x[3]), (weight[2], weight[3]))
            .expect("shapes were checked when the node was added");
        let u = |v: usize| v as u32;
        ConvParams {
            batch: u(x[0]),
            c_in: u(x[1]),
            h: u(x[2]),
            w: u(x[3]),
            c_out: u(weight[0]),
            kh: u(weight[2]),
            kw: u(weight[3]),
            ho: u(ho),
            wo: u(wo),
            stride_h: u(self.stride.0),
            stride_w: u(self.stride.1),
            pad_h: u(self.padding.0),
            pad_w: u(self.padding.1),
            splits: 1,
            chunk: 0,
            first_split: 0,
            x_at: [0, 0],
            y_at: [0, 0],
            dy_at: [0, 0],
            dx_at: [0, 0],
        }
    }

    /// CPU reference: `y = conv2d(x, weight, bias, stride, padding)`.
    pub fn cpu_forward(&self, x: &CpuTensor, weight: &CpuTensor, bias: &[f32]) -> CpuTensor {
        let p = self.params(&x.shape, &weight.shape);
        let (n, ci, co) = (p.batch as usize, p.c_in as usize, p.c_out as usize);
        let mut y = CpuTensor::zeros(&[n, co, p.ho as usize, p.wo as usize]);
        for img in 0..n {
            for (o, &b) in bias.iter().enumerate() {
                for oy in 0..p.ho as usize {
                    for ox in 0..p.wo as usize {
                        let mut sum = b as f64;
                        self.for_each_tap(&p, oy, ox, |c, ky, kx, iy, ix| {
                            sum += (weight.data
                                [((o * ci + c) * p.kh as usize + ky) * p.kw as usize + kx]
                                * x.data[((img * ci + c) * p.h as usize + iy) * p.w as usize + ix])
                                as f64;
                        });
                        y.data[((img * co + o) * p.ho as usize + oy) * p.wo as usize + ox] =
                            sum as f32;
                    }
                }
            }
        }
        y
    }

    /// CPU reference for the gradients `(dx, dweight, dbias)` given `dy`.
    pub fn cpu_backward(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        dy: &CpuTensor,
    ) -> (CpuTensor, CpuTensor, Vec<f32>) {
        let p = self.params(&x.shape, &weight.shape);
        let (n, ci, co) = (p.batch as usize, p.c_in as usize, p.c_out as usize);
        let mut dx = CpuTensor::zeros(&x.shape);
        // Filter and bias gradients sum batch x positions terms: accumulate in f64.
        let mut dw = vec![0.0f64; weight.data.len()];
        let mut db = vec![0.0f64; co];
        for img in 0..n {
            for (o, db_o) in db.iter_mut().enumerate() {
                for oy in 0..p.ho as usize {
                    for ox in 0..p.wo as usize {
                        let g = dy.data[((img * co + o) * p.ho as usize + oy) * p.wo as usize + ox];
                        *db_o += g as f64;
                        self.for_each_tap(&p, oy, ox, |c, ky, kx, iy, ix| {
                            let wi = ((o * ci + c) * p.kh as usize + ky) * p.kw as usize + kx;
                            let xi = ((img * ci + c) * p.h as usize + iy) * p.w as usize + ix;
                            dx.data[xi] += g * weight.data[wi];
                            dw[wi] += (g * x.data[xi]) as f64;
                        });
                    }
                }
            }
        }
        let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        (dx, CpuTensor::new(&weight.shape, narrow(dw)), narrow(db))
    }

    /// Calls `f(c, ky, kx, iy, ix)` for every tap of output (oy, ox) that
    /// lands inside the input.
    fn for_each_tap(
        &self,
        p: &ConvParams,
        oy: usize,
        ox: usize,
        mut f: impl FnMut(usize, usize, usize, usize, usize),
    ) {
        for c in 0..p.c_in as usize {
            for ky in 0..p.kh as usize {
                for kx in 0..p.kw as usize {
                    let iy = (oy * self.stride.0 + ky) as isize - self.padding.0 as isize;
                    let ix = (ox * self.stride.1 + kx) as isize - self.padding.1 as isize;
                    if iy >= 0
                        && ix >= 0
                        && (iy as usize) < p.h as usize
                        && (ix as usize) < p.w as usize
                    {
                        f(c, ky, kx, iy as usize, ix as usize);
                    }
                }
            }
        }
    }
}

impl Op for Conv2d {
    fn describe(&self) -> String {
        format!("conv2d stride {:?} padding {:?}", self.stride, self.padding)
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let [x, weight, bias] = inputs else {
            bail!("conv2d takes x, weight and bias")
        };
        expect_rank(x, 4, "conv2d input")?;
        expect_rank(weight, 4, "conv2d weight")?;
        let (xs, ws) = (&x.shape, &weight.shape);
        if xs[1] != ws[1] {
            bail!(
                "conv2d weight {ws:?} expects {} input channels, the input {xs:?} has {}",
                ws[1],
                xs[1]
            );
        }
        if bias.shape != [ws[0]] {
            bail!(
                "conv2d bias {:?} does not match {} output channels",
                bias.shape,
                ws[0]
            );
        }
        let (ho, wo) = self.output_size((xs[2], xs[3]), (ws[2], ws[3]))?;
        Ok(vec![(vec![xs[0], ws[0], ho, wo], DType::F32)])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[1, 2])
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        conv_flops(&outputs[0].shape, &inputs[1].shape)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.plan_activated(ctx, inputs, outputs, None)
    }

    fn with_activation(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(Activated::new(*self, activation)))
    }

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        let (x, weight) = (inputs[0], inputs[1]);
        let xs = g.shape(x).to_vec();
        let ws = g.shape(weight).to_vec();
        let dx = if needs[0] {
            Some(g.apply1(
                Conv2dBackwardData {
                    conv: *self,
                    input: xs,
                },
                &[dy, weight],
            )?)
        } else {
            None
        };
        let dw = if needs[1] {
            Some(g.apply1(
                Conv2dBackwardFilter {
                    conv: *self,
                    kernel: (ws[2], ws[3]),
                    out_channels: vec![ws[0]],
                },
                &[x, dy],
            )?)
        } else {
            None
        };
        let db = if needs[2] {
            Some(g.apply1(ChannelSum, &[dy])?)
        } else {
            None
        };
        Ok(vec![dx, dw, db])
    }
}

impl Epilogue for Conv2d {
    fn plan_activated(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Option<Activation>,
    ) -> Result<()> {
        let mut p = self.params(&ctx.shape(inputs[0]), &ctx.shape(inputs[1]));
        (p.x_at, p.y_at) = (ctx.layout(inputs[0]), ctx.layout(outputs[0]));
        if let GemmKernel::Blocked { workgroup, .. } = ctx.gpu.tuning.gemm {
            let kernel = ("conv_forward", activation);
            return plan_blocked_forward(ctx, &p, (kernel, workgroup), inputs, outputs[0]);
        }
        let pixels = (p.batch * p.ho * p.wo) as usize;
        let tile = channel_tile(p.c_out as usize);
        let storage = ctx.bind(&[
            (1, inputs[0]),
            (2, inputs[1]),
            (3, inputs[2]),
            (4, outputs[0]),
        ]);
        let (shader, entry, [tile_constant]) = kernel("forward", tile);
        let constants = [tile_constant, activation_constant(activation)];
        ctx.dispatch_tiled(
            (shader, entry, &constants),
            &p,
            &storage,
            pixels.div_ceil(PIXELS_PER_INVOCATION),
            (p.c_out as usize).div_ceil(tile),
        )
    }
}

/// 2 per multiply-add of a convolution with output `y` `[n, c_out, ho, wo]`
/// and weight `[c_out, c_in, kh, kw]`: the same for its two gradients.
pub(super) fn conv_flops(y: &[usize], weight: &[usize]) -> u64 {
    2 * (y.iter().product::<usize>() * weight[1..].iter().product::<usize>()) as u64
}

impl ConvParams {
    /// This convolution for `conv_rows` (x and y at the given layouts)
    /// where it is stride 1.
    fn row_conv(&self, (x_at, out_at): ([u32; 2], [u32; 2])) -> Option<RowConv> {
        (self.stride_h == 1 && self.stride_w == 1).then_some(RowConv {
            samples: self.batch,
            channels: self.c_in,
            input: (self.h, self.w),
            pad: (self.pad_h, self.pad_w),
            kernel: (self.kh, self.kw),
            rows: self.c_out,
            out: (self.ho, self.wo),
            x_at,
            out_at,
        })
    }

    /// Whether the blocked data gradient's one tapped phase stores the
    /// zeros of the three its 1x1 kernel with stride 2 leaves untapped (the
    /// shader's `ZERO_PHASES`): dx exactly twice dy in both axes, dy's rows
    /// an even width, so that each two of a phase row's pixels and the
    /// row below them are two vec4s of dx. dx's rows are then whole vec4s,
    /// and so are its layout's offsets and act_out's, which are whole
    /// planes of the same size.
    fn stores_untapped_zeros(&self) -> bool {
        let shortcut = (self.kh, self.kw, self.pad_h, self.pad_w) == (1, 1, 0, 0)
            && (self.stride_h, self.stride_w) == (2, 2);
        shortcut && self.h == 2 * self.ho && self.w == 2 * self.wo && self.wo.is_multiple_of(2)
    }

    /// The blocked kernels' uniform with this convolution's geometry: x is
    /// gathered at (oy * stride - pad + ky, ox * stride - pad + kx).
    fn blocked(&self) -> BlockedParams {
        BlockedParams {
            x_h: self.h,
            x_w: self.w,
            kh: self.kh,
            kw: self.kw,
            out_w: self.wo,
            stride_h: self.stride_h,
            stride_w: self.stride_w,
            pad_h: self.pad_h as i32,
            pad_w: self.pad_w as i32,
            x_at: self.x_at,
            ..BlockedParams::default()
        }
    }
}

/// The forward pass on CPU adapters: `y = W im2col(x) + bias` on the
/// register-tiled kernel, rows = output channels, columns = output pixels.
fn plan_blocked_forward(
    ctx: &mut PlanContext,
    p: &ConvParams,
    (kernel, workgroup): ((&'static str, Option<Activation>), u32),
    inputs: &[TensorId],
    y: TensorId,
) -> Result<()> {
    let taps = p.c_in * p.kh * p.kw;
    let columns = p.batch * p.ho * p.wo;
    let weight = ctx.binding(inputs[1]);
    let rows = blocked::padded_rows(p.c_out);
    let packed_weight = blocked::packed_k_major(
        ctx,
        weight,
        PackParams::matrix(p.c_out, rows, taps, taps, 1),
    )?;
    let rows_conv = p.row_conv((p.x_at, p.y_at));
    if let Some(rows_conv) = rows_conv.filter(|r| r.chosen(ctx, workgroup)) {
        let storage = (ctx.binding(inputs[0]), ctx.binding(y));
        let bias = Some(ctx.binding(inputs[2]));
        let kernel = (workgroup, kernel.1);
        return rows_conv.plan(ctx, kernel, packed_weight, (bias, None), storage);
    }
    let params = BlockedParams {
        m: p.c_out,
        n: columns,
        k: taps,
        a_quads: rows / 4,
        b_quads: blocked::padded_columns(columns) / 4,
        ..p.blocked()
    }
    .contiguous_output(p.ho * p.wo, p.y_at);
    let storage = [
        (1, packed_weight),
        (3, ctx.binding(inputs[2])),
        (4, ctx.binding(y)),
        (7, ctx.binding(inputs[0])),
    ];
    blocked::dispatch(ctx, kernel, workgroup, (&params, &[]), &storage)
}

/// dx from dy and the weight. Keeps the input shape, which the output shape
/// alone does not determine (floor division).
#[derive(Clone, Debug)]
pub struct Conv2dBackwardData {
    pub conv: Conv2d,
    pub input: Shape,
}

impl Op for Conv2dBackwardData {
    fn describe(&self) -> String {
        format!("{} backward data", self.conv.describe())
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(self.input.clone(), DType::F32)])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[1])
    }

    fn flops(&self, inputs: &[&Tensor], _outputs: &[&Tensor]) -> u64 {
        conv_flops(&inputs[0].shape, &inputs[1].shape)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.plan_through(ctx, inputs, outputs[0], None)
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        WithActivationBackward::op(self.clone(), activation)
    }
}

impl GradientEpilogue for Conv2dBackwardData {
    fn plan_activation_backward(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Activation,
    ) -> Result<()> {
        self.plan_through(ctx, &inputs[..2], outputs[0], Some((activation, inputs[2])))
    }
}

impl Conv2dBackwardData {
    /// Records the data gradient into `dx`, carried on through the backward
    /// of `through`'s activation, given its output (the convolution's
    /// input), where there is one.
    fn plan_through(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        dx: TensorId,
        through: Option<(Activation, TensorId)>,
    ) -> Result<()> {
        let mut p = self.conv.params(&ctx.shape(dx), &ctx.shape(inputs[1]));
        (p.dy_at, p.dx_at) = (ctx.layout(inputs[0]), ctx.layout(dx));
        let through = through.map(|(activation, y)| {
            p.x_at = ctx.layout(y);
            (activation, ctx.binding(y))
        });
        if let GemmKernel::Blocked { workgroup, .. } = ctx.gpu.tuning.gemm {
            return plan_blocked_backward_data(ctx, &p, workgroup, inputs, (dx, through));
        }
        let pixels = (p.batch * p.h * p.w) as usize;
        let tile = channel_tile(p.c_in as usize);
        let mut storage = ctx.bind(&[(2, inputs[1]), (5, inputs[0]), (6, dx)]);
        let (shader, entry, [tile_constant]) = kernel("backward_data", tile);
        // x is read only to carry the gradient through an activation.
        let (activation, y) = match through {
            Some((activation, y)) => (Some(activation), y),
            None => (None, ctx.scratch(4)?),
        };
        storage.push((1, y));
        let constants = [
            tile_constant,
            activation_constant(activation),
            ("ACTIVATION_BACKWARD", activation.is_some() as u32),
        ];
        ctx.dispatch_tiled(
            (shader, entry, &constants),
            &p,
            &storage,
            pixels.div_ceil(PIXELS_PER_INVOCATION),
            (p.c_in as usize).div_ceil(tile),
        )
    }
}

/// The data gradient on CPU adapters: for each phase (iy mod stride, ix mod
/// stride) of dx, a stride-1 convolution of dy with the kernel taps that
/// land on that phase, flipped (`conv_transposed` in
/// `shaders/gemm_blocked.wgsl`), rows = input channels. One phase when the
/// stride is 1. Phases no tap reaches (a kernel narrower than its stride)
/// are stored as zeros beside the tapped phase's results where the
/// geometry allows (`ConvParams::stores_untapped_zeros`), else zeroed in
/// one pass over dx first (which the backward of ReLU or a sigmoid leaves
/// zero). With `through`, the stores carry the gradient on
/// through the activation's backward, from its output at `p.x_at`.
fn plan_blocked_backward_data(
    ctx: &mut PlanContext,
    p: &ConvParams,
    workgroup: u32,
    inputs: &[TensorId],
    (dx, through): (TensorId, Option<(Activation, Binding)>),
) -> Result<()> {
    let activation = through.as_ref().map(|(activation, _)| *activation);
    let act_out = through.map(|(_, y)| (y, p.x_at));
    let row_phases: Vec<Phase> = (0..p.stride_h)
        .map(|ry| Phase::new(ry, p.h, p.kh, p.stride_h, p.pad_h))
        .collect();
    let col_phases: Vec<Phase> = (0..p.stride_w)
        .map(|rx| Phase::new(rx, p.w, p.kw, p.stride_w, p.pad_w))
        .collect();
    let untapped = |phases: &[Phase]| phases.iter().any(|ph| ph.pixels > 0 && ph.taps == 0);
    let zeros_stored = p.stores_untapped_zeros();
    if (untapped(&row_phases) || untapped(&col_phases)) && !zeros_stored {
        eltwise::fill_zeros(ctx, dx)?;
    }
    for (ry, rows) in (0..).zip(&row_phases) {
        for (rx, cols) in (0..).zip(&col_phases) {
            let columns = p.batch * rows.pixels * cols.pixels;
            if columns == 0 || rows.taps == 0 || cols.taps == 0 {
                continue;
            }
            let (sh, sw) = (p.stride_h as i32, p.stride_w as i32);
            let pack = PackParams::weight_taps(
                [p.c_out, p.c_in, p.kh, p.kw],
                (rows.taps, cols.taps),
                (rows.last_tap(sh), cols.last_tap(sw)),
                (-sh, -sw),
            );
            let weight = ctx.binding(inputs[1]);
            let packed_weight = blocked::packed_k_major(ctx, weight, pack)?;
            let whole_dx = p.stride_h == 1 && p.stride_w == 1;
            let pads = (u32::try_from(rows.pad()), u32::try_from(cols.pad()));
            if let (true, (Ok(pad_h), Ok(pad_w))) = (whole_dx, pads) {
                let rows_conv = RowConv {
                    samples: p.batch,
                    channels: p.c_out,
                    input: (p.ho, p.wo),
                    pad: (pad_h, pad_w),
                    kernel: (p.kh, p.kw),
                    rows: p.c_in,
                    out: (p.h, p.w),
                    x_at: p.dy_at,
                    out_at: p.dx_at,
                };
                if rows_conv.chosen(ctx, workgroup) {
                    let storage = (ctx.binding(inputs[0]), ctx.binding(dx));
                    let kernel = (workgroup, activation);
                    return rows_conv.plan(ctx, kernel, packed_weight, (None, act_out), storage);
                }
            }
            let params = BlockedParams {
                m: p.c_in,
                n: columns,
                k: p.c_out * rows.taps * cols.taps,
                a_quads: blocked::padded_rows(p.c_in) / 4,
                b_quads: blocked::padded_columns(columns) / 4,
                x_h: p.ho,
                x_w: p.wo,
                kh: rows.taps,
                kw: cols.taps,
                out_w: cols.pixels,
                stride_h: 1,
                stride_w: 1,
                pad_h: rows.pad(),
                pad_w: cols.pad(),
                x_at: p.dy_at,
                act_at: p.x_at,
                ..BlockedParams::default()
            }
            .contiguous_output(rows.pixels * cols.pixels, p.dx_at);
            // A phase of a strided one is every stride-th pixel of dx;
            // stride 1's is all of dx, whose planes may be whole vec4s
            // where its rows are not (6 x 6).
            let params = if whole_dx {
                params
            } else {
                BlockedParams {
                    dst_plane: p.h * p.w,
                    dst_w: cols.pixels,
                    dst_row: p.stride_h * p.w,
                    dst_step: p.stride_w,
                    dst_first: ry * p.w + rx,
                    ..params
                }
            };
            let mut storage = vec![
                (1, packed_weight),
                (4, ctx.binding(dx)),
                (7, ctx.binding(inputs[0])),
            ];
            storage.extend((act_out.clone()).map(|(y, _)| (blocked::ACT_OUT, y)));
            let kernel = ("conv_transposed", activation);
            let zeros = [("ZERO_PHASES", zeros_stored as u32)];
            blocked::dispatch(ctx, kernel, workgroup, (&params, &zeros), &storage)?;
        }
    }
    Ok(())
}

/// One phase `r` of a strided data gradient along one axis: dx positions
/// `r, r + stride, ...` receive dy through kernel taps `first, first +
/// stride, ...` (those with `(r + pad - tap) % stride == 0`).
struct Phase {
    /// dx positions in the phase.
    pixels: u32,
    /// Kernel taps that reach them.
    taps: u32,
    first: u32,
    /// dy position of phase pixel j through tap `first + stride t`: j + offset - t.
    offset: u32,
}

impl Phase {
    fn new(r: u32, size: u32, kernel: u32, stride: u32, pad: u32) -> Phase {
        let first = (r + pad) % stride;
        Phase {
            pixels: size.saturating_sub(r).div_ceil(stride),
            taps: kernel.saturating_sub(first).div_ceil(stride),
            first,
            offset: (r + pad - first) / stride,
        }
    }

    /// The phase's last kernel tap, where the flipped taps start.
    fn last_tap(&self, stride: i32) -> i32 {
        self.first as i32 + stride * (self.taps as i32 - 1)
    }

    /// The stride-1 padding that makes flipped tap t' of phase pixel j read
    /// dy at j - pad + t' = j + offset - (taps - 1 - t').
    fn pad(&self) -> i32 {
        self.taps as i32 - 1 - self.offset as i32
    }
}

/// dweight from x and dy: split over batch and positions, then the splits
/// summed. One output per weight: dy's channels are the output channels of
/// the weights in order (several for `ParallelConv2d`).
#[derive(Debug)]
pub struct Conv2dBackwardFilter {
    pub conv: Conv2d,
    pub kernel: (usize, usize),
    pub out_channels: Vec<usize>,
}

/// Terms each split of the blocked filter gradient sums: long enough that
/// the 512 partial sums an invocation writes per split cost little.
const BLOCKED_SPLIT_TERMS: usize = 2048;

/// Terms (16-pixel row segments of dy) each lane of
/// `conv_rows_filter_gradient` sums: LeNet's first layer has 14,336 at
/// batch 256, 224 lanes.
const ROW_SPLIT_TERMS: u32 = 64;

impl Conv2dBackwardFilter {
    /// The filter gradient of a stride-1 convolution with few output
    /// channels on `conv_rows_filter_gradient` (see `RowConv`), then the
    /// splits summed. Plans nothing and returns false where that kernel
    /// does not take it.
    fn plan_rows(
        &self,
        ctx: &mut PlanContext,
        (whole, weight): (&ConvParams, &[usize]),
        inputs: &[TensorId],
        dweights: &[TensorId],
    ) -> Result<bool> {
        let (x, dy) = (inputs[0], inputs[1]);
        let layouts = (ctx.layout(x), ctx.layout(dy));
        let Some(rows) = (whole.row_conv(layouts)).filter(|r| r.filter_gradient_fits(ctx)) else {
            return Ok(false);
        };
        let chunks = ctx.batch_chunks(&[x, dy])?;
        let longest = chunks.iter().map(|&(_, count)| count).max().unwrap_or(1) as u32;
        let splits = RowConv {
            samples: longest,
            ..rows
        }
        .filter_gradient_splits(ROW_SPLIT_TERMS);
        let pieces = (splits, ROW_SPLIT_TERMS);
        let len = weight.iter().product::<usize>();
        let partial = ctx.scratch(4 * (chunks.len() * splits as usize * len) as u64)?;
        ctx.for_each_chunk(&[x, dy], |ctx, chunk| {
            let mut p = self.conv.params(&ctx.shape(x), weight);
            (p.x_at, p.dy_at) = (ctx.layout(x), ctx.layout(dy));
            let rows = p.row_conv((p.x_at, p.dy_at)).expect("stride 1");
            let bindings = (ctx.binding(x), ctx.binding(dy), partial.clone());
            let (splits, k_split) = pieces;
            rows.plan_filter_gradient(ctx, bindings, (chunk as u32 * splits, splits, k_split))
        })?;
        let all_splits = chunks.len() * splits as usize;
        self.sum_splits_into(ctx, (&partial, all_splits), weight, dweights)?;
        Ok(true)
    }

    /// The filter gradient on CPU adapters: `dy im2col(x)^T` on the
    /// register-tiled kernel, rows = output channels, columns = taps, the
    /// sum over each batch chunk's output pixels split along K. Plans
    /// nothing and returns false when a chunk of dy, packed with its
    /// channels padded to the tile (up to 8x the bytes for one channel),
    /// would not bind at once.
    fn plan_blocked(
        &self,
        ctx: &mut PlanContext,
        (whole, weight): (&ConvParams, &[usize]),
        workgroup: u32,
        inputs: &[TensorId],
        dweights: &[TensorId],
    ) -> Result<bool> {
        let (x, dy) = (inputs[0], inputs[1]);
        let taps = (whole.c_in * whole.kh * whole.kw) as usize;
        let len = whole.c_out as usize * taps;
        let pixels = (whole.ho * whole.wo) as usize;
        let chunks = ctx.batch_chunks(&[x, dy])?;
        let longest = chunks.iter().map(|&(_, count)| count).max().unwrap_or(1) * pixels;
        let fit_binding = (ctx.gpu.max_binding() as usize / 4) / (len * chunks.len());
        // Each lane of a tile writes its own slice: no more lanes than slices fit.
        let fit_lanes = 1 << fit_binding.clamp(1, u32::MAX as usize).ilog2();
        let windows = TapWindows::new(whole.kw, whole.stride_w);
        let pixel_quads = BlockedParams {
            pixels: pixels as u32,
            x_at: ctx.layout(x),
            ..whole.blocked()
        }
        .reads_pixel_quads();
        // The window kernel reads dy packed k-major, in one binding.
        let packed_bytes = 4 * blocked::padded_rows(whole.c_out) as u64 * longest as u64;
        if !pixel_quads && packed_bytes > ctx.gpu.max_binding() {
            return Ok(false);
        }
        let k_lanes =
            blocked::k_lanes(taps as u32, windows, workgroup, pixel_quads, fit_lanes) as usize;
        let splits = longest
            .div_ceil(BLOCKED_SPLIT_TERMS)
            .next_multiple_of(k_lanes)
            .min(fit_binding / k_lanes * k_lanes)
            .max(longest.div_ceil(MAX_LOOP_TRIPS).next_multiple_of(k_lanes));
        // Splits of whole output rows: the lanes of a workgroup start their
        // rows together, and slide their windows together (less than a row
        // more per split stays far inside llvmpipe's loop limit). The
        // pointwise kernel's splits are whole vec4s of pixels instead.
        let split_step = match pixel_quads {
            true => 4,
            false => whole.wo as usize,
        };
        let k_split = longest.div_ceil(splits).next_multiple_of(split_step);
        let partial = ctx.scratch(4 * (chunks.len() * splits * len) as u64)?;
        ctx.for_each_chunk(&[x, dy], |ctx, chunk| {
            let mut p = self.conv.params(&ctx.shape(x), weight);
            (p.x_at, p.dy_at) = (ctx.layout(x), ctx.layout(dy));
            // The pointwise kernel reads dy as it is: planes of x's pixels,
            // whole vec4s, at offsets of whole planes.
            let dy_stored = ctx.binding(dy);
            let a = match pixel_quads {
                true => dy_stored,
                false => {
                    let planes = (p.c_out, pixels as u32, p.batch);
                    blocked::packed_channels_by_pixels(ctx, dy_stored, planes, p.dy_at)?
                }
            };
            let params = BlockedParams {
                m: p.c_out,
                n: taps as u32,
                k: p.batch * pixels as u32,
                a_quads: blocked::padded_rows(p.c_out) / 4,
                pixels: pixels as u32,
                k_split: k_split as u32,
                first_split: (chunk * splits) as u32,
                dy_at: p.dy_at,
                ..p.blocked()
            }
            .contiguous_output(taps as u32, [0, 0]);
            let storage = [(1, a), (4, partial.clone()), (7, ctx.binding(x))];
            // Every split, also those past a shorter chunk's terms: they
            // write zeros, where the final sum would otherwise read what
            // the shared scratch memory held.
            let lanes = (workgroup, k_lanes as u32);
            blocked::dispatch_split(ctx, lanes, (&params, windows), &storage, splits as u32)
        })?;
        self.sum_splits_into(ctx, (&partial, chunks.len() * splits), weight, dweights)?;
        Ok(true)
    }

    /// Sums the `splits` partial filter gradients of the whole `weight`
    /// shape in `partial` into each weight's gradient, its rows in turn.
    fn sum_splits_into(
        &self,
        ctx: &mut PlanContext,
        (partial, splits): (&Binding, usize),
        weight: &[usize],
        dweights: &[TensorId],
    ) -> Result<()> {
        let row_len: usize = weight[1..].iter().product();
        let mut first = 0;
        for (&channels, &dweight) in self.out_channels.iter().zip(dweights) {
            let rows = first * row_len..(first + channels) * row_len;
            let total = ReduceParams::sum_split_range(rows, weight[0] * row_len, splits);
            sum_splits(ctx, &total, partial, &ctx.binding(dweight))?;
            first += channels;
        }
        Ok(())
    }
}

impl Op for Conv2dBackwardFilter {
    fn describe(&self) -> String {
        format!("{} backward filter", self.conv.describe())
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let (x, dy) = (&inputs[0].shape, &inputs[1].shape);
        if self.out_channels.iter().sum::<usize>() != dy[1] {
            bail!(
                "weights of {:?} output channels do not make up the {} of dy {dy:?}",
                self.out_channels,
                dy[1]
            );
        }
        let (kh, kw) = self.kernel;
        let shape = |&channels: &usize| (vec![channels, x[1], kh, kw], DType::F32);
        Ok(self.out_channels.iter().map(shape).collect())
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        conv_flops(&inputs[1].shape, &outputs[0].shape)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let (x, dy) = (inputs[0], inputs[1]);
        let (kh, kw) = self.kernel;
        let ws = vec![ctx.shape(dy)[1], ctx.shape(x)[1], kh, kw];
        let whole = self.conv.params(&ctx.shape(x), &ws);
        if let GemmKernel::Blocked { workgroup, .. } = ctx.gpu.tuning.gemm {
            if self.plan_rows(ctx, (&whole, &ws), inputs, outputs)?
                || self.plan_blocked(ctx, (&whole, &ws), workgroup, inputs, outputs)?
            {
                return Ok(());
            }
        }
        let taps = (whole.c_in * whole.kh * whole.kw) as usize;
        let tile = channel_tile(whole.c_out as usize);
        // Few taps (LeNet's first layer has 25: 7 invocations) would leave
        // most of a wide workgroup idle, and idle lanes still cost on CPU
        // adapters: size the workgroup to the taps, 8 to the adapter's.
        let tap_lanes = taps.div_ceil(PIXELS_PER_INVOCATION);
        let workgroup = (tap_lanes.next_power_of_two() as u32).clamp(8, ctx.gpu.tuning.workgroup);
        let tap_groups = tap_lanes.div_ceil(workgroup as usize);
        let channel_blocks = (whole.c_out as usize).div_ceil(tile);
        let plane = (whole.ho * whole.wo) as usize;
        let len = ws.iter().product::<usize>();
        let lanes = tap_groups * channel_blocks * workgroup as usize;
        let (chunks, splits) = chunked_splits(ctx, &[x, dy], plane, lanes, len)?;
        let partial = ctx.scratch(4 * (chunks * splits * len) as u64)?;
        let constants = [("TC", tile as u32), ("WG", workgroup)];
        ctx.for_each_chunk(&[x, dy], |ctx, chunk| {
            let mut p = self.conv.params(&ctx.shape(x), &ws);
            (p.x_at, p.dy_at) = (ctx.layout(x), ctx.layout(dy));
            p.splits = splits as u32;
            p.chunk = (p.batch as usize * plane).div_ceil(splits) as u32;
            p.first_split = (chunk * splits) as u32;
            let storage = [
                (1, ctx.binding(x)),
                (5, ctx.binding(dy)),
                (7, partial.clone()),
            ];
            ctx.dispatch_grid(
                (Shader::Conv2d, "backward_filter", &constants),
                &p,
                &storage,
                [tap_groups, channel_blocks, splits],
            )
        })?;
        self.sum_splits_into(ctx, (&partial, chunks * splits), &ws, outputs)
    }
}
