//! Optimizer updates over the flat parameter and gradient buffers
//! (`graph::ParamStore`), with torch.optim's semantics: `torch.optim.SGD`
//! (momentum, weight decay; dampening 0, no Nesterov) and `torch.optim.Adam`
//! (weight decay added to the gradient, no AMSGrad).

use crate::gpu::Shader;
use crate::graph::{Binding, DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
    Adam {
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
    },
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => write!(
                f,
                "sgd lr {lr} momentum {momentum} weight_decay {weight_decay}"
            ),
            Optimizer::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            } => write!(
                f,
                "adam lr {lr} betas ({}, {}) eps {eps:e} weight_decay {weight_decay}",
                betas.0, betas.1
            ),
        }
    }
}

impl Optimizer {
    /// d2l's optimizer: `torch.optim.SGD(net.parameters(), lr)`.
    pub fn sgd(lr: f32) -> Optimizer {
        Optimizer::Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }

    /// `torch.optim.Adam(net.parameters(), lr, weight_decay=...)` with its
    /// default betas and eps.
    pub fn adam(lr: f32, weight_decay: f32) -> Optimizer {
        Optimizer::Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
        }
    }

    /// Per-parameter state tensors, named as in torch's optimizer state.
    pub fn state_names(&self) -> &'static [&'static str] {
        match *self {
            Optimizer::Sgd { momentum: 0.0, .. } => &[],
            Optimizer::Sgd { .. } => &["momentum_buffer"],
            Optimizer::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// Whether the update depends on a step count (Adam's bias correction).
    pub fn counts_steps(&self) -> bool {
        matches!(self, Optimizer::Adam { .. })
    }

    /// CPU reference of one step; `state` holds `state_names().len()`
    /// zero-initialised vectors, `step` is the 1-based step number.
    pub fn cpu(&self, param: &mut [f32], grad: &[f32], state: &mut [Vec<f32>], step: u32) {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                for (i, (w, g)) in param.iter_mut().zip(grad).enumerate() {
                    let mut g = g + weight_decay * *w;
                    if let Some(buf) = state.first_mut() {
                        buf[i] = momentum * buf[i] + g;
                        g = buf[i];
                    }
                    *w -= lr * g;
                }
            }
            Optimizer::Adam {
                lr,
                betas: (b1, b2),
                eps,
                weight_decay,
            } => {
                let t = step as i32;
                let step_size = lr as f64 / (1.0 - (b1 as f64).powi(t));
                let correction2_sqrt = (1.0 - (b2 as f64).powi(t)).sqrt();
                let [m, v] = state else {
                    panic!("adam keeps two state tensors")
                };
                for (i, (w, g)) in param.iter_mut().zip(grad).enumerate() {
                    let g = g + weight_decay * *w;
                    m[i] += (1.0 - b1) * (g - m[i]);
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let denom = (v[i] as f64).sqrt() / correction2_sqrt + eps as f64;
                    *w -= (step_size * m[i] as f64 / denom) as f32;
                }
            }
        }
    }

    fn params(&self, len: u32) -> OptimParams {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => OptimParams {
                len,
                lr,
                weight_decay,
                momentum,
                ..OptimParams::default()
            },
            Optimizer::Adam {
                lr,
                betas: (b1, b2),
                eps,
                weight_decay,
            } => OptimParams {
                len,
                lr,
                weight_decay,
                momentum: b1,
                one_minus_beta1: (1.0 - f64::from(b1)) as f32,
                beta2: b2,
                one_minus_beta2: (1.0 - f64::from(b2)) as f32,
                eps,
            },
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct OptimParams {
    len: u32,
    lr: f32,
    weight_decay: f32,
    momentum: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
}

/// Bytes of Adam's step record on the GPU: count and bias corrections.
pub const ADAM_STEP_BYTES: u64 = 16;

/// One optimizer step. Input: the flat gradients. Outputs, updated in
/// place: the flat parameters, then one flat buffer per state tensor
/// (`Optimizer::state_names`), then for Adam its step record.
#[derive(Debug)]
pub struct OptimizerStep(pub Optimizer);

impl Op for OptimizerStep {
    fn describe(&self) -> String {
        self.0.to_string()
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("the optimizer updates the parameters in place (Graph::apply_into)")
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let states = self.0.state_names().len();
        let flat: Vec<Binding> = std::iter::once(inputs[0])
            .chain(outputs[..1 + states].iter().copied())
            .map(|t| ctx.binding(t))
            .collect();
        let entry = match (self.0, states) {
            (Optimizer::Sgd { .. }, 0) => "sgd",
            (Optimizer::Sgd { .. }, _) => "sgd_momentum",
            (Optimizer::Adam { .. }, _) => "adam",
        };
        let step = if self.0.counts_steps() {
            let step = ctx.binding(outputs[1 + states]);
            ctx.dispatch_single(
                Shader::Optim,
                "adam_count",
                &self.0.params(0),
                &[(5, &step)],
            )?;
            Some(step)
        } else {
            None
        };
        // One dispatch per range the adapter lets a single binding cover.
        let total = flat[1].size;
        let max_binding = ctx.gpu.max_binding();
        let mut offset = 0;
        while offset < total {
            let size = max_binding.min(total - offset);
            let mut storage: Vec<(u32, Binding)> = flat
                .iter()
                .enumerate()
                .map(|(slot, b)| {
                    let range = Binding {
                        buffer: b.buffer.clone(),
                        offset: b.offset + offset,
                        size,
                    };
                    (slot as u32 + 1, range)
                })
                .collect();
            if let Some(step) = &step {
                storage.push((5, step.clone()));
            }
            let p = self.0.params((size / 16) as u32);
            ctx.dispatch(Shader::Optim, entry, &p, &storage, (size / 16) as usize)?;
            offset += size;
        }
        Ok(())
    }
}
