//! Convolutions of one input with the same kernel size, stride and padding,
//! each followed by the same activation: an Inception block's three 1x1
//! convolutions of its input. Forward, each runs on its own, into its own
//! output (which the block's concatenation may hold). Backward, they are
//! one convolution whose weight is theirs concatenated along the output
//! channels and whose dy is `torch.cat` of theirs: one data gradient over
//! all their channels, where three would be narrow products (GoogLeNet
//! reduces to 16-48 channels) and two more passes would add them up, and
//! one filter gradient.

use super::conv2d::conv_flops;
use super::fused::Epilogue;
use super::{
    Activation, ActivationBackward, ChannelSum, ConcatRows, Conv2d, Conv2dBackwardData,
    Conv2dBackwardFilter,
};
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

/// The inputs after x: (weight, bias) of each convolution, as many as
/// `shared_inputs` can list.
const WEIGHTS_AND_BIASES: [usize; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const MOST_CONVS: usize = WEIGHTS_AND_BIASES.len() / 2;

/// Inputs: x, then each convolution's weight and bias; outputs: each
/// convolution's activated output, in the same order.
#[derive(Debug)]
pub struct ParallelConv2d {
    pub conv: Conv2d,
    pub activation: Activation,
}

impl Op for ParallelConv2d {
    fn describe(&self) -> String {
        format!(
            "parallel {} + {}",
            self.conv.describe(),
            self.activation.describe()
        )
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let convs = inputs.len().saturating_sub(1) / 2;
        if inputs.len().is_multiple_of(2) || !(1..=MOST_CONVS).contains(&convs) {
            bail!(
                "parallel conv2d takes x and 1 to {MOST_CONVS} (weight, bias) pairs, got {} inputs",
                inputs.len()
            );
        }
        let mut outputs = Vec::with_capacity(convs);
        for pair in inputs[1..].chunks(2) {
            outputs.extend(self.conv.infer(&[inputs[0], pair[0], pair[1]])?);
            let (kernel, first) = (&pair[0].shape[2..], &inputs[1].shape[2..]);
            if kernel != first {
                bail!("parallel convolutions need one kernel size, got {first:?} and {kernel:?}");
            }
        }
        Ok(outputs)
    }

    fn shared_inputs(&self) -> Option<&'static [usize]> {
        Some(&WEIGHTS_AND_BIASES)
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        let weights = inputs[1..].iter().step_by(2);
        (outputs.iter().zip(weights))
            .map(|(y, weight)| conv_flops(&y.shape, &weight.shape))
            .sum()
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        for (pair, &y) in inputs[1..].chunks(2).zip(outputs) {
            let conv_inputs = [inputs[0], pair[0], pair[1]];
            self.conv
                .plan_activated(ctx, &conv_inputs, &[y], Some(self.activation))?;
        }
        Ok(())
    }

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let mut dys = Vec::with_capacity(outputs.len());
        for (&y, &dy) in outputs.iter().zip(output_grads) {
            let Some(dy) = dy else {
                bail!("{}: every output needs a gradient", self.describe());
            };
            dys.push(g.apply1(ActivationBackward(self.activation), &[y, dy])?);
        }
        // Each convolution's dy becomes its channels of the whole one.
        let dy = g.concat(&dys)?;
        let x = inputs[0];
        let weights: Vec<TensorId> = inputs[1..].iter().step_by(2).copied().collect();
        let mut grads = vec![None; inputs.len()];
        if needs[0] {
            let weight = g.apply1(ConcatRows, &weights)?;
            let input = g.shape(x).to_vec();
            let data = Conv2dBackwardData {
                conv: self.conv,
                input,
            };
            grads[0] = Some(g.apply1(data, &[dy, weight])?);
        }
        if needs[1..].iter().step_by(2).any(|&need| need) {
            let kernel = (g.shape(weights[0])[2], g.shape(weights[0])[3]);
            let out_channels = weights.iter().map(|&w| g.shape(w)[0]).collect();
            let filter = Conv2dBackwardFilter {
                conv: self.conv,
                kernel,
                out_channels,
            };
            for (j, dweight) in g.apply(filter, &[x, dy])?.into_iter().enumerate() {
                grads[1 + 2 * j] = Some(dweight);
            }
        }
        for (j, &dy) in dys.iter().enumerate() {
            if needs[2 + 2 * j] {
                grads[2 + 2 * j] = Some(g.apply1(ChannelSum, &[dy])?);
            }
        }
        Ok(grads)
    }
}
