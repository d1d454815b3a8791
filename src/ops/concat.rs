//! `torch.cat(dim=1)` as a graph rewrite, not a kernel: `Graph::concat`
//! makes every input a channel slice of the output, so the ops producing
//! the inputs write straight into place and this node records no dispatch.

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
