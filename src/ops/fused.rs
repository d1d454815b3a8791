//! An op followed by an activation, as one op: the activation runs in the
//! op's epilogue, applied to each result as it is stored (`ACTIVATION` in
//! `shaders/prelude.wgsl`). The executor fuses at plan time (see
//! `graph::fusion`), after autodiff has added the backward nodes, so a fused
//! op is only ever planned.

use super::Activation;
use crate::graph::{DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::Result;

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
