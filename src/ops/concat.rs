//! `torch.cat(dim=1)` as a graph rewrite, not a kernel: `Graph::concat`
//! makes every input a channel slice of the output, so the ops producing
//! the inputs write straight into place and this node records no dispatch.
//! `torch.cat(dim=0)` of weights, which live apart in the parameter store,
//! copies them.

use super::eltwise;
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[derive(Debug)]
pub struct Concat;

impl Op for Concat {
    fn describe(&self) -> String {
        "concat".into()
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("concatenation is built with Graph::concat")
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn plan(
        &self,
        _ctx: &mut PlanContext,
        _inputs: &[TensorId],
        _outputs: &[TensorId],
    ) -> Result<()> {
        Ok(())
    }

    /// Each input's gradient is its slice of the output's gradient.
    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        let mut channel = 0;
        let mut grads = Vec::with_capacity(inputs.len());
        for (&x, &need) in inputs.iter().zip(needs) {
            let channels = g.shape(x)[1];
            grads.push(need.then(|| g.channel_slice(dy, channel, channels)));
            channel += channels;
        }
        Ok(grads)
    }
}

/// `torch.cat(inputs, dim=0)` of contiguous tensors (the weights of a
/// `ParallelConv2d`, for its data gradient): one copy per input.
#[derive(Debug)]
pub struct ConcatRows;

impl Op for ConcatRows {
    fn describe(&self) -> String {
        "concat rows".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let first = &inputs[0].shape;
        if let Some(other) = inputs
            .iter()
            .find(|t| t.shape.is_empty() || t.shape[1..] != first[1..] || t.dtype != DType::F32)
        {
            bail!(
                "concatenating rows needs f32 tensors that differ only in their first dimension, \
                 got {first:?} and {:?}",
                other.shape
            );
        }
        let mut shape = first.clone();
        shape[0] = inputs.iter().map(|t| t.shape[0]).sum();
        Ok(vec![(shape, DType::F32)])
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let mut offset = 0;
        for &x in inputs {
            eltwise::copy_into(ctx, x, outputs[0], offset)?;
            offset += ctx.len(x);
        }
        Ok(())
    }
}
