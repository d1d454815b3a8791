//! Elementwise ops: activations and dropout with their backward rules, and
//! the gradient sum autodiff inserts where a tensor feeds several nodes.

use super::fused::{
    activation_constant, Activated, Epilogue, GradientEpilogue, WithActivationBackward,
};
use super::CpuTensor;
use crate::gpu::Shader;
use crate::graph::{Binding, DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::rc::Rc;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct EltwiseParams {
    len: u32,
    salt: u32,
    threshold: u32,
    scale: f32,
    sample: u32,
    _pad: u32,
    x_at: [u32; 2],
    y_at: [u32; 2],
    dy_at: [u32; 2],
    out_at: [u32; 2],
}

/// Records `entry` over every element of `out`, reading `(slot, tensor)`
/// inputs, or where the samples and the layouts are whole vec4s its form
/// that takes four elements per invocation (`quads`, with the `ACTIVATION`
/// constant for `activation`; x, y, dy and out at slots 6 to 9).
fn elementwise_quads(
    ctx: &mut PlanContext,
    kernels: (&'static str, &'static str, Option<Activation>),
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> Result<()> {
    let params = sized(ctx, &EltwiseParams::default(), inputs, out);
    record_quads_or_one_by_one(ctx, kernels, &params, inputs, out)
}

/// `elementwise_quads` with its sizes and layouts in `params`.
fn record_quads_or_one_by_one(
    ctx: &mut PlanContext,
    (entry, quads, activation): (&'static str, &'static str, Option<Activation>),
    params: &EltwiseParams,
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> Result<()> {
    let layouts = [
        [params.sample, 0],
        params.x_at,
        params.y_at,
        params.dy_at,
        params.out_at,
    ];
    if layouts.concat().iter().any(|v| v % 4 != 0) {
        return record_one_by_one(ctx, (entry, activation), params, inputs, out);
    }
    let mut storage: Vec<(u32, Binding)> = (inputs.iter())
        .map(|&(slot, t)| (slot + 5, ctx.binding(t)))
        .collect();
    storage.push((9, ctx.binding(out)));
    let constants = [activation_constant(activation)];
    let kernel = (Shader::Eltwise, quads, &constants[..]);
    ctx.dispatch_with(kernel, params, &storage, params.len as usize / 4)
}

/// Records a pass that sets every element of `out` to zero.
pub(super) fn fill_zeros(ctx: &mut PlanContext, out: TensorId) -> Result<()> {
    elementwise_quads(ctx, ("zeros", "zeros_quads", None), &[], out)
}

/// Records a copy of all of `x` into `out` from element `offset` on, four
/// elements per invocation where the length and offset are whole vec4s.
pub(super) fn copy_into(
    ctx: &mut PlanContext,
    x: TensorId,
    out: TensorId,
    offset: usize,
) -> Result<()> {
    let len = ctx.len(x) as u32;
    let params = EltwiseParams {
        len,
        sample: len,
        x_at: [0, len],
        out_at: [offset as u32, len],
        ..EltwiseParams::default()
    };
    let kernels = ("copy", "copy_quads", None);
    record_quads_or_one_by_one(ctx, kernels, &params, &[(1, x)], out)
}

/// Records `entry` over every element of `out` with dropout's parameters,
/// one per invocation; fills in the sizes and layouts.
fn with_params(
    ctx: &mut PlanContext,
    entry: &'static str,
    params: &EltwiseParams,
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> Result<()> {
    let params = sized(ctx, params, inputs, out);
    record_one_by_one(ctx, (entry, None), &params, inputs, out)
}

/// Records `entry` over the `params.len` elements of `out`, one per
/// invocation (with the `ACTIVATION` constant for `activation`).
fn record_one_by_one(
    ctx: &mut PlanContext,
    (entry, activation): (&'static str, Option<Activation>),
    params: &EltwiseParams,
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> Result<()> {
    let mut storage = ctx.bind(inputs);
    storage.push((4, ctx.binding(out)));
    let constants = [activation_constant(activation)];
    let kernel = (Shader::Eltwise, entry, &constants[..]);
    ctx.dispatch_with(kernel, params, &storage, params.len as usize)
}

/// `params` with the sizes and the layouts of `inputs` and `out` filled in.
fn sized(
    ctx: &PlanContext,
    params: &EltwiseParams,
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> EltwiseParams {
    let mut params = *params;
    params.len = ctx.len(out) as u32;
    params.sample = ctx.graph.tensor(out).sample_len() as u32;
    let contiguous = [0, params.sample];
    (params.x_at, params.y_at, params.dy_at) = (contiguous, contiguous, contiguous);
    params.out_at = ctx.layout(out);
    for &(slot, t) in inputs {
        match slot {
            1 => params.x_at = ctx.layout(t),
            2 => params.y_at = ctx.layout(t),
            3 => params.dy_at = ctx.layout(t),
            _ => {}
        }
    }
    params
}

fn same_shape(inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
    let first = &inputs[0].shape;
    if let Some(other) = inputs.iter().find(|t| &t.shape != first) {
        bail!("shapes differ: {first:?} and {:?}", other.shape);
    }
    Ok(vec![(first.clone(), DType::F32)])
}

/// `nn.Sigmoid` and `nn.ReLU`. Both backward rules need only the output y:
/// sigmoid' = y (1 - y); ReLU passes dy where y > 0 (PyTorch gives 0 at x = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Sigmoid,
    Relu,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::Sigmoid => "sigmoid",
            Activation::Relu => "relu",
        }
    }

    /// Shader entry points: (forward, backward).
    fn entries(self) -> (&'static str, &'static str) {
        match self {
            Activation::Sigmoid => ("sigmoid_forward", "sigmoid_backward"),
            Activation::Relu => ("relu_forward", "relu_backward"),
        }
    }

    pub fn cpu_forward(self, x: &CpuTensor) -> CpuTensor {
        let f = |v: f32| match self {
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            // PyTorch's ReLU passes NaN through (f32::max would drop it).
            Activation::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
        };
        CpuTensor::new(&x.shape, x.data.iter().map(|&v| f(v)).collect())
    }

    pub fn cpu_backward(self, y: &CpuTensor, dy: &CpuTensor) -> CpuTensor {
        let df = |y: f32, g: f32| match self {
            Activation::Sigmoid => g * y * (1.0 - y),
            Activation::Relu => {
                if y > 0.0 {
                    g
                } else {
                    0.0
                }
            }
        };
        CpuTensor::new(
            &y.shape,
            y.data
                .iter()
                .zip(&dy.data)
                .map(|(&y, &g)| df(y, g))
                .collect(),
        )
    }
}

impl Op for Activation {
    fn describe(&self) -> String {
        self.name().into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn activation(&self) -> Option<Activation> {
        Some(*self)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let kernel = (self.entries().0, "activation_forward_quads", Some(*self));
        elementwise_quads(ctx, kernel, &[(1, inputs[0])], outputs[0])
    }

    fn backward(
        &self,
        g: &mut Graph,
        _inputs: &[TensorId],
        outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        Ok(vec![Some(
            g.apply1(ActivationBackward(*self), &[outputs[0], dy])?,
        )])
    }
}

/// dx from the activation's output y and dy.
#[derive(Debug)]
pub struct ActivationBackward(pub Activation);

impl Op for ActivationBackward {
    fn describe(&self) -> String {
        format!("{} backward", self.0.name())
    }

    fn activation_backward(&self) -> Option<Activation> {
        Some(self.0)
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let kernel = (
            self.0.entries().1,
            "activation_backward_quads",
            Some(self.0),
        );
        elementwise_quads(ctx, kernel, &[(2, inputs[0]), (3, inputs[1])], outputs[0])
    }
}

/// `a + b`; its gradient flows unchanged to both inputs.
#[derive(Clone, Copy, Debug)]
pub struct Add;

impl Op for Add {
    fn describe(&self) -> String {
        "add".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&[])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.plan_activated(ctx, inputs, outputs, None)
    }

    fn with_activation(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(Activated::new(*self, activation)))
    }

    fn is_sum(&self) -> bool {
        true
    }

    fn with_activation_backward(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        WithActivationBackward::op(*self, activation)
    }

    fn backward(
        &self,
        _g: &mut Graph,
        _inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        Ok(vec![output_grads[0], output_grads[0]])
    }
}

/// A sum of gradients that only an activation's backward reads (ResNet's
/// block outputs: the gradient from the next block's convolution plus its
/// shortcut's): one pass, the sum never written.
impl GradientEpilogue for Add {
    fn plan_activation_backward(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Activation,
    ) -> Result<()> {
        let kernel = (
            "add_activation_backward",
            "add_activation_backward_quads",
            Some(activation),
        );
        let inputs = [(1, inputs[0]), (2, inputs[1]), (3, inputs[2])];
        elementwise_quads(ctx, kernel, &inputs, outputs[0])
    }
}

/// ResNet's `relu(y + shortcut)`: the sum is never written.
impl Epilogue for Add {
    fn plan_activated(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Option<Activation>,
    ) -> Result<()> {
        let kernel = ("add", "add_quads", activation);
        elementwise_quads(ctx, kernel, &[(1, inputs[0]), (2, inputs[1])], outputs[0])
    }
}

/// Mirrors the shader's hash: true where dropout keeps element `i` of layer
/// `salt` in training step `step` (the CPU reference for tests).
pub fn dropout_keeps(seed: u32, salt: u32, step: u32, i: u32, p: f32) -> bool {
    fn mix(x: u32) -> u32 {
        let mut h = x;
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^= h >> 15;
        h = h.wrapping_mul(0x846c_a68b);
        h ^ (h >> 16)
    }
    let h = mix(mix(mix(seed ^ salt).wrapping_add(step)).wrapping_add(i));
    h >= Dropout::threshold(p)
}

/// `nn.Dropout(p)` in training mode: inverted dropout, kept elements scaled
/// by 1 / (1 - p). Inputs: x and the random stream `[seed, step]` (u32 [2]),
/// which `AdvanceRng` moves on after every training step. `salt` tells
/// layers apart.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub salt: u32,
}

impl Dropout {
    fn threshold(p: f32) -> u32 {
        (f64::from(p) * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32
    }

    fn params(&self) -> EltwiseParams {
        EltwiseParams {
            salt: self.salt,
            threshold: Self::threshold(self.p),
            scale: 1.0 / (1.0 - self.p),
            ..EltwiseParams::default()
        }
    }
}

impl Op for Dropout {
    fn describe(&self) -> String {
        format!("dropout p {}", self.p)
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        if !(0.0..1.0).contains(&self.p) {
            bail!("dropout probability {} must be in [0, 1)", self.p);
        }
        if inputs[1].shape != [2] || inputs[1].dtype != DType::U32 {
            bail!("dropout's random stream must be u32 [2]");
        }
        Ok(vec![(inputs[0].shape.clone(), DType::F32)])
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let params = self.params();
        with_params(
            ctx,
            "dropout_forward",
            &params,
            &[(1, inputs[0]), (5, inputs[1])],
            outputs[0],
        )
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
        Ok(vec![
            Some(g.apply1(DropoutBackward { dropout: *self }, &[dy, inputs[1]])?),
            None,
        ])
    }
}

/// dx = dy times the same mask and scale as the forward pass.
#[derive(Debug)]
pub struct DropoutBackward {
    pub dropout: Dropout,
}

impl Op for DropoutBackward {
    fn describe(&self) -> String {
        format!("{} backward", self.dropout.describe())
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(inputs[0].shape.clone(), DType::F32)])
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let params = self.dropout.params();
        with_params(
            ctx,
            "dropout_backward",
            &params,
            &[(3, inputs[0]), (5, inputs[1])],
            outputs[0],
        )
    }
}

/// Moves dropout's random stream to the next step (written in place).
#[derive(Debug)]
pub struct AdvanceRng;

impl Op for AdvanceRng {
    fn describe(&self) -> String {
        "advance dropout stream".into()
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("advancing the random stream writes in place (Graph::apply_into)")
    }

    fn plan(
        &self,
        ctx: &mut PlanContext,
        _inputs: &[TensorId],
        outputs: &[TensorId],
    ) -> Result<()> {
        let rng = ctx.binding(outputs[0]);
        let one_step = EltwiseParams {
            len: 1,
            ..EltwiseParams::default()
        };
        ctx.dispatch_single(Shader::Eltwise, "advance_rng", &one_step, &[(5, &rng)])
    }
}
