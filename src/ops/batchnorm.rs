//! `nn.BatchNorm1d` / `nn.BatchNorm2d` over the channel dimension, in
//! training mode (batch statistics, running statistics updated) or
//! evaluation mode (running statistics). Pairs with `shaders/batchnorm.wgsl`.

use super::blocked::with_quad_view;
use super::fused::{activation_constant, Activated, Epilogue};
use super::reduce::chunked_splits;
use super::{Activation, CpuTensor};
use crate::gpu::Shader;
use crate::graph::{Binding, DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::rc::Rc;

/// Inputs: x `[n, c]` or `[n, c, h, w]`, gamma, beta, running_mean,
/// running_var (all `[c]`). Outputs: y, and in training the batch mean and
/// 1/sqrt(var + eps) the backward pass needs. Training also updates the
/// running statistics in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    pub eps: f32,
    pub momentum: f32,
    pub training: bool,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    batch: u32,
    channels: u32,
    spatial: u32,
    splits: u32,
    chunk: u32,
    eps: f32,
    momentum: f32,
    first_split: u32,
    x_at: [u32; 2],
    dy_at: [u32; 2],
    out_at: [u32; 2],
    count: u32,
    _pad: u32,
    addend_at: [u32; 2],
}

/// The CPU reference's results for one training forward.
pub struct BatchNormCpu {
    pub y: CpuTensor,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

impl BatchNorm {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1.
    pub fn new(training: bool) -> BatchNorm {
        BatchNorm {
            eps: 1e-5,
            momentum: 0.1,
            training,
        }
    }

    /// Uniform parameters for input `x` (of the current batch chunk) and,
    /// where the kernels use them, `dy` and `out`, with the channel sums
    /// cut into `splits`.
    fn params(
        &self,
        ctx: &PlanContext,
        tensors: (TensorId, Option<TensorId>, Option<TensorId>),
        splits: usize,
    ) -> NormParams {
        let (x, dy, out) = tensors;
        let x_shape = ctx.shape(x);
        let (batch, channels) = (x_shape[0], x_shape[1]);
        let spatial: usize = x_shape[2..].iter().product();
        let contiguous = [0, (channels * spatial) as u32];
        let layout = |t: Option<TensorId>| t.map_or(contiguous, |t| ctx.layout(t));
        let terms = batch * spatial;
        NormParams {
            batch: batch as u32,
            channels: channels as u32,
            spatial: spatial as u32,
            splits: splits as u32,
            chunk: terms.div_ceil(splits) as u32,
            eps: self.eps,
            momentum: self.momentum,
            first_split: 0,
            x_at: ctx.layout(x),
            dy_at: layout(dy),
            out_at: layout(out),
            count: (ctx.graph.shape(x)[0] * spatial) as u32,
            _pad: 0,
            addend_at: [0, 0],
        }
    }

    /// Records `entry` once per batch chunk of `batched` (x first), each
    /// chunk writing its `splits` partial sums per channel behind the
    /// earlier chunks' into `partial`, four values a term (`QUADS`, x and
    /// dy also bound as vec4s at slots 17 and 18) where the positions and
    /// layouts are whole vec4s; returns the total number of splits.
    fn record_partials(
        &self,
        ctx: &mut PlanContext,
        entry: &'static str,
        batched: &[TensorId],
        storage: &[(u32, TensorId)],
    ) -> Result<(Binding, usize)> {
        let x = batched[0];
        let shape = ctx.shape(x);
        let channels = shape[1];
        let spatial: usize = shape[2..].iter().product();
        let (chunks, splits) = chunked_splits(ctx, batched, spatial, channels, 4 * channels)?;
        let partial = ctx.scratch(16 * (chunks * splits * channels) as u64)?;
        let dy = batched.get(1).copied();
        ctx.for_each_chunk(batched, |ctx, chunk| {
            let mut p = self.params(ctx, (x, dy, None), splits);
            p.first_split = (chunk * splits) as u32;
            let quads = [[p.spatial, 0], p.x_at, p.dy_at]
                .concat()
                .iter()
                .all(|v| v % 4 == 0);
            if quads {
                // Counted in vec4s.
                p.spatial /= 4;
                (p.x_at, p.dy_at) = (p.x_at.map(|v| v / 4), p.dy_at.map(|v| v / 4));
                p.chunk = (p.batch * p.spatial).div_ceil(p.splits);
            }
            // x and dy also as vec4s, which QUADS reads.
            let mut b = ctx.bind(storage);
            for slot in [1, 2] {
                b = with_quad_view(ctx, &b, (slot, quad_slot(slot)))?;
            }
            b.push((5, partial.clone()));
            let kernel = (Shader::BatchNorm, entry, &[("QUADS", quads as u32)][..]);
            ctx.dispatch_with(kernel, &p, &b, splits * channels)
        })?;
        Ok((partial, chunks * splits))
    }

    /// Records the per-element `entry` from `x` to `y`, a batch chunk at a
    /// time, applying `activation` to what it stores.
    fn record_normalize(
        &self,
        ctx: &mut PlanContext,
        kernel: ((&'static str, &'static str), Option<Activation>),
        (x, y): (TensorId, TensorId),
        storage: &[(u32, TensorId)],
    ) -> Result<()> {
        let kernel = (kernel.0, activation_constant(kernel.1));
        ctx.for_each_chunk(&[x, y], |ctx, _| {
            let p = self.params(ctx, (x, None, Some(y)), 1);
            let storage = ctx.bind(storage);
            record_elementwise(ctx, kernel, &p, &storage)
        })
    }

    /// Per channel (mean, biased variance) over batch and positions, in f64.
    fn cpu_stats(x: &CpuTensor) -> (Vec<f64>, Vec<f64>, usize) {
        let c = x.shape[1];
        let spatial = x.data.len() / (x.shape[0] * c);
        let count = x.data.len() / c;
        let mut mean = vec![0.0f64; c];
        for (i, v) in x.data.iter().enumerate() {
            mean[(i / spatial) % c] += *v as f64 / count as f64;
        }
        let mut var = vec![0.0f64; c];
        for (i, v) in x.data.iter().enumerate() {
            let ch = (i / spatial) % c;
            var[ch] += (*v as f64 - mean[ch]).powi(2) / count as f64;
        }
        (mean, var, count)
    }

    /// CPU reference for a training forward.
    pub fn cpu_train(
        &self,
        x: &CpuTensor,
        gamma: &[f32],
        beta: &[f32],
        running: (&[f32], &[f32]),
    ) -> BatchNormCpu {
        let (mean, var, count) = Self::cpu_stats(x);
        let c = gamma.len();
        let spatial = x.data.len() / (x.shape[0] * c);
        let y = x
            .data
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / spatial) % c;
                ((*v as f64 - mean[ch]) / (var[ch] + self.eps as f64).sqrt() * gamma[ch] as f64
                    + beta[ch] as f64) as f32
            })
            .collect();
        let m = self.momentum as f64;
        let unbiased = count as f64 / (count as f64 - 1.0).max(1.0);
        BatchNormCpu {
            y: CpuTensor::new(&x.shape, y),
            running_mean: (0..c)
                .map(|ch| ((1.0 - m) * running.0[ch] as f64 + m * mean[ch]) as f32)
                .collect(),
            running_var: (0..c)
                .map(|ch| ((1.0 - m) * running.1[ch] as f64 + m * var[ch] * unbiased) as f32)
                .collect(),
        }
    }

    /// CPU reference for evaluation mode.
    pub fn cpu_eval(
        &self,
        x: &CpuTensor,
        gamma: &[f32],
        beta: &[f32],
        running: (&[f32], &[f32]),
    ) -> CpuTensor {
        let c = gamma.len();
        let spatial = x.data.len() / (x.shape[0] * c);
        let y = x
            .data
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / spatial) % c;
                (v - running.0[ch]) / (running.1[ch] + self.eps).sqrt() * gamma[ch] + beta[ch]
            })
            .collect();
        CpuTensor::new(&x.shape, y)
    }

    /// CPU reference for the training-mode gradients `(dx, dgamma, dbeta)`.
    pub fn cpu_backward(
        &self,
        x: &CpuTensor,
        gamma: &[f32],
        dy: &CpuTensor,
    ) -> (CpuTensor, Vec<f32>, Vec<f32>) {
        let (mean, var, count) = Self::cpu_stats(x);
        let c = gamma.len();
        let spatial = x.data.len() / (x.shape[0] * c);
        let invstd: Vec<f64> = var
            .iter()
            .map(|v| 1.0 / (v + self.eps as f64).sqrt())
            .collect();
        let xhat =
            |i: usize| (x.data[i] as f64 - mean[(i / spatial) % c]) * invstd[(i / spatial) % c];
        let mut dgamma = vec![0.0f64; c];
        let mut dbeta = vec![0.0f64; c];
        for (i, g) in dy.data.iter().enumerate() {
            dgamma[(i / spatial) % c] += *g as f64 * xhat(i);
            dbeta[(i / spatial) % c] += *g as f64;
        }
        let n = count as f64;
        let dx = (0..x.data.len())
            .map(|i| {
                let ch = (i / spatial) % c;
                (gamma[ch] as f64 * invstd[ch] / n
                    * (n * dy.data[i] as f64 - dbeta[ch] - xhat(i) * dgamma[ch]))
                    as f32
            })
            .collect();
        let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (CpuTensor::new(&x.shape, dx), narrow(dgamma), narrow(dbeta))
    }
}

impl Op for BatchNorm {
    fn describe(&self) -> String {
        format!("batch_norm{}", if self.training { "" } else { " (eval)" })
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let x = &inputs[0].shape;
        if x.len() != 2 && x.len() != 4 {
            bail!("batch norm takes (N, C) or (N, C, H, W), got {x:?}");
        }
        if let Some(t) = inputs[1..].iter().find(|t| t.shape != [x[1]]) {
            bail!(
                "batch norm parameters must be [{}], got {:?}",
                x[1],
                t.shape
            );
        }
        let mut outputs = vec![(x.clone(), DType::F32)];
        if self.training {
            outputs.push((vec![x[1]], DType::F32));
            outputs.push((vec![x[1]], DType::F32));
        }
        Ok(outputs)
    }

    fn handles_channel_slices(&self) -> bool {
        true
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
        outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        if !self.training {
            bail!("batch norm in evaluation mode has no backward pass here");
        }
        let dy = output_grads[0].expect("only y carries a gradient");
        let (x, gamma) = (inputs[0], inputs[1]);
        let (mean, invstd) = (outputs[1], outputs[2]);
        let sums = g.apply(
            BatchNormBackwardParams { norm: *self },
            &[x, dy, mean, invstd],
        )?;
        let dx = g.apply1(
            BatchNormBackwardData {
                norm: *self,
                addend: false,
            },
            &[x, dy, mean, invstd, gamma, sums[0], sums[1]],
        )?;
        Ok(vec![Some(dx), Some(sums[0]), Some(sums[1]), None, None])
    }
}

/// dgamma = sum dy * xhat and dbeta = sum dy, per channel.
#[derive(Debug)]
pub struct BatchNormBackwardParams {
    norm: BatchNorm,
}

impl Epilogue for BatchNorm {
    fn plan_activated(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Option<Activation>,
    ) -> Result<()> {
        let &[x, gamma, beta, running_mean, running_var] = inputs else {
            bail!("batch norm takes five inputs")
        };
        let y = outputs[0];
        if !self.training {
            let storage = [
                (1, x),
                (3, gamma),
                (4, beta),
                (8, running_mean),
                (9, running_var),
                (10, y),
            ];
            let kernel = (("normalize_eval", "normalize_eval_quads"), activation);
            return self.record_normalize(ctx, kernel, (x, y), &storage);
        }
        let (mean, invstd) = (outputs[1], outputs[2]);
        let (partial, splits) = self.record_partials(ctx, "stats_partial", &[x], &[(1, x)])?;
        let p = self.params(ctx, (x, None, None), splits);
        let mut b = ctx.bind(&[(6, mean), (7, invstd), (8, running_mean), (9, running_var)]);
        b.push((5, partial));
        ctx.dispatch(
            Shader::BatchNorm,
            "stats_finalize",
            &p,
            &b,
            p.channels as usize,
        )?;
        let storage = [
            (1, x),
            (3, gamma),
            (4, beta),
            (10, y),
            (11, mean),
            (12, invstd),
        ];
        let kernel = (("normalize", "normalize_quads"), activation);
        self.record_normalize(ctx, kernel, (x, y), &storage)
    }
}

impl Op for BatchNormBackwardParams {
    fn describe(&self) -> String {
        "batch_norm backward params".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let c = inputs[0].shape[1];
        Ok(vec![(vec![c], DType::F32), (vec![c], DType::F32)])
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let &[x, dy, mean, invstd] = inputs else {
            bail!("batch norm's parameter gradients take four inputs")
        };
        let storage = [(1, x), (2, dy), (11, mean), (12, invstd)];
        let (partial, splits) =
            self.norm
                .record_partials(ctx, "backward_partial", &[x, dy], &storage)?;
        let p = self.norm.params(ctx, (x, Some(dy), None), splits);
        let mut b = ctx.bind(&[(13, outputs[0]), (14, outputs[1])]);
        b.push((5, partial));
        ctx.dispatch(
            Shader::BatchNorm,
            "backward_finalize",
            &p,
            &b,
            p.channels as usize,
        )
    }
}

/// dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma), plus with
/// `addend` one more input added as it stores: the gradient that reached
/// x by another path (DenseNet's concatenations), whose sum with this one
/// is then never a pass of its own (`fusion`).
#[derive(Debug)]
pub struct BatchNormBackwardData {
    norm: BatchNorm,
    addend: bool,
}

impl Op for BatchNormBackwardData {
    fn describe(&self) -> String {
        match self.addend {
            true => "batch_norm backward data + add".into(),
            false => "batch_norm backward data".into(),
        }
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(inputs[0].shape.clone(), DType::F32)])
    }

    /// Per sample once the sums are known: mean, invstd, gamma, dgamma
    /// and dbeta are shared by every chunk.
    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[2, 3, 4, 5, 6])
    }

    fn with_addend(&self) -> Option<Rc<dyn Op>> {
        (!self.addend).then(|| {
            Rc::new(BatchNormBackwardData {
                norm: self.norm,
                addend: true,
            }) as Rc<dyn Op>
        })
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let (x, dy, dx) = (inputs[0], inputs[1], outputs[0]);
        let mut p = self.norm.params(ctx, (x, Some(dy), Some(dx)), 1);
        let slots = [1, 2, 11, 12, 3, 15, 16, ADDEND];
        let tensors: Vec<(u32, TensorId)> =
            slots.iter().copied().zip(inputs.iter().copied()).collect();
        let mut storage = ctx.bind(&tensors);
        storage.push((10, ctx.binding(dx)));
        match inputs.get(7) {
            Some(&addend) => p.addend_at = ctx.layout(addend),
            // The kernels bind an addend anyway: a stand-in, never read.
            None => storage.push((ADDEND, ctx.scratch(16)?)),
        }
        let kernel = (
            ("backward_data", "backward_data_quads"),
            ("ADDEND", self.addend as u32),
        );
        record_elementwise(ctx, kernel, &p, &storage)
    }
}

/// The slot of the addend `BatchNormBackwardData` adds (its vec4 view is
/// the next).
const ADDEND: u32 = 20;

/// The slot of a binding's vec4 view (x, dy, out and the addend at 17, 18,
/// 19 and 21), which the `*_quads` kernels and QUADS read.
fn quad_slot(slot: u32) -> u32 {
    match slot {
        1 => 17,
        2 => 18,
        10 => 19,
        ADDEND => ADDEND + 1,
        _ => slot,
    }
}

/// Vec4s of one plane a `*_quads` per-element kernel's invocation takes.
const RUN_QUADS: u32 = 16;

/// Records a per-element kernel over x with its one override `constant`:
/// its `quads` form (four elements of one channel per invocation; views at
/// `quad_slot`s) where the planes and the layouts are whole vec4s, else
/// `entry`.
fn record_elementwise(
    ctx: &mut PlanContext,
    ((entry, quads), constant): ((&'static str, &'static str), (&'static str, u32)),
    p: &NormParams,
    storage: &[(u32, Binding)],
) -> Result<()> {
    let planes = (p.batch * p.channels) as usize;
    let in_quads = [[p.spatial, 0], p.x_at, p.dy_at, p.out_at, p.addend_at].concat();
    if in_quads.iter().any(|v| v % 4 != 0) {
        let len = planes * p.spatial as usize;
        return ctx.dispatch_with((Shader::BatchNorm, entry, &[constant]), p, storage, len);
    }
    let storage: Vec<(u32, Binding)> = (storage.iter())
        .map(|(slot, b)| (quad_slot(*slot), b.clone()))
        .collect();
    let runs = (p.spatial / 4).div_ceil(RUN_QUADS) as usize;
    let constants = [constant, ("RUN", RUN_QUADS)];
    ctx.dispatch_with(
        (Shader::BatchNorm, quads, &constants),
        p,
        &storage,
        planes * runs,
    )
}
