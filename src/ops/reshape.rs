//! Reshape (`nn.Flatten` and friends): a view of the same bytes, no GPU work.

use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[derive(Debug)]
pub struct Reshape {
    pub shape: Shape,
}

impl Reshape {
    /// `nn.Flatten()`: keep the batch dimension, merge the rest.
    pub fn flatten(input: &[usize]) -> Reshape {
        Reshape {
            shape: vec![input[0], input[1..].iter().product()],
        }
    }
}

impl Op for Reshape {
    fn describe(&self) -> String {
        format!("reshape to {:?}", self.shape)
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let x = inputs[0];
        if x.len() != self.shape.iter().product::<usize>() {
            bail!("cannot reshape {:?} to {:?}", x.shape, self.shape);
        }
        Ok(vec![(self.shape.clone(), x.dtype)])
    }

    fn is_view(&self) -> bool {
        true
    }

    /// A view keeps its source's layout (the executor checks that the
    /// batch dimension stays).
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

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        let back = Reshape {
            shape: g.shape(inputs[0]).to_vec(),
        };
        Ok(vec![Some(g.apply1(back, &[dy])?)])
    }
}
