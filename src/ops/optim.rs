//! Optimizer updates over the flat parameter and gradient buffers
//! (`graph::ParamStore`), with torch.optim's semantics.

use crate::gpu::Shader;
use crate::graph::{Binding, DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdParams {
    len: u32,
    lr: f32,
    _pad: [u32; 2],
}

/// Plain SGD, d2l's default: `w -= lr * grad`. Input: the flat gradients;
/// output (updated in place): the flat parameters.
#[derive(Debug)]
pub struct SgdStep {
    pub lr: f32,
}

impl SgdStep {
    pub fn cpu(&self, param: &mut [f32], grad: &[f32]) {
        for (w, g) in param.iter_mut().zip(grad) {
            *w -= self.lr * g;
        }
    }
}

impl Op for SgdStep {
    fn describe(&self) -> String {
        format!("sgd lr {}", self.lr)
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("the optimizer updates the parameters in place (Graph::apply_into)")
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let (grads, params) = (ctx.binding(inputs[0]), ctx.binding(outputs[0]));
        // One dispatch per range the adapter lets a single binding cover.
        let max_binding = ctx.gpu.max_binding();
        let mut offset = 0;
        while offset < params.size {
            let size = max_binding.min(params.size - offset);
            let range = |b: &Binding| Binding {
                buffer: b.buffer.clone(),
                offset: b.offset + offset,
                size,
            };
            let p = SgdParams {
                len: (size / 16) as u32,
                lr: self.lr,
                _pad: [0; 2],
            };
            ctx.dispatch(
                Shader::Optim,
                "sgd",
                &p,
                &[(1, &range(&grads)), (2, &range(&params))],
                (size / 16) as usize,
            )?;
            offset += size;
        }
        Ok(())
    }
}
