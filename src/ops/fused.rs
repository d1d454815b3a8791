//! An op followed by an activation, or by an activation's backward, as one
//! op: the activation (or its derivative) is applied to each result as it is
//! stored (`ACTIVATION` in `shaders/prelude.wgsl`). The executor fuses at
//! plan time (see `graph::fusion`), after autodiff has added the backward
//! nodes, so a fused op is only ever planned.

use super::Activation;
use crate::graph::{DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::Result;
use std::rc::Rc;

/// Ops whose kernels can apply an activation as they store.
pub trait Epilogue: Op + Copy + 'static {
    fn plan_activated(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Option<Activation>,
    ) -> Result<()>;
}

/// The `ACTIVATION` override constant for kernels with an epilogue.
pub fn activation_constant(activation: Option<Activation>) -> (&'static str, u32) {
    let code = match activation {
        None => 0,
        Some(Activation::Relu) => 1,
        Some(Activation::Sigmoid) => 2,
    };
    ("ACTIVATION", code)
}

#[derive(Debug)]
pub struct Activated<O> {
    pub op: O,
    pub activation: Activation,
}

impl<O> Activated<O> {
    pub fn new(op: O, activation: Activation) -> Activated<O> {
        Activated { op, activation }
    }
}

impl<O: Epilogue> Op for Activated<O> {
    fn describe(&self) -> String {
        format!("{} + {}", self.op.describe(), self.activation.describe())
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        self.op.infer(inputs)
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        self.op.shared_inputs()
    }

    fn handles_channel_slices(&self) -> bool {
        self.op.handles_channel_slices()
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        self.op.flops(inputs, outputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.op
            .plan_activated(ctx, inputs, outputs, Some(self.activation))
    }
}

/// Ops producing the gradient at an activation's output that can carry it
/// on through the activation as they store, given the activation's output
/// as one more input (the last).
pub trait GradientEpilogue: Op + Clone + 'static {
    fn plan_activation_backward(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Activation,
    ) -> Result<()>;
}

/// `op`, then `activation`'s backward: its inputs are `op`'s and the
/// activation's output, its output the gradient at the activation's input.
#[derive(Debug)]
pub struct WithActivationBackward<O> {
    pub op: O,
    pub activation: Activation,
}

impl<O: GradientEpilogue> WithActivationBackward<O> {
    /// The fused op, as `Op::with_activation_backward` gives it.
    pub fn op(op: O, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(WithActivationBackward { op, activation }))
    }
}

impl<O: GradientEpilogue> Op for WithActivationBackward<O> {
    fn describe(&self) -> String {
        format!(
            "{} + {} backward",
            self.op.describe(),
            self.activation.describe()
        )
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        self.op.infer(&inputs[..inputs.len() - 1])
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        self.op.shared_inputs()
    }

    fn handles_channel_slices(&self) -> bool {
        self.op.handles_channel_slices()
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        self.op.flops(&inputs[..inputs.len() - 1], outputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.op
            .plan_activation_backward(ctx, inputs, outputs, self.activation)
    }
}
