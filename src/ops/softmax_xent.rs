//! Softmax cross-entropy (`nn.CrossEntropyLoss()`, mean over the batch) with
//! its gradient in one kernel, and the running loss/accuracy sums that the
//! trainer reads once per epoch instead of once per step.

use super::{expect_rank, CpuTensor};
use crate::gpu::Shader;
use crate::graph::{DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct XentParams {
    batch: u32,
    classes: u32,
    grad_scale: f32,
    _pad: u32,
}

/// Inputs: logits `[batch, classes]`, labels `[batch]` (u32). Outputs:
/// per-sample loss, per-sample correctness (u32 0/1) and, when `with_grad`,
/// dlogits = (softmax - onehot) / batch, the gradient of the mean loss.
#[derive(Debug)]
pub struct SoftmaxCrossEntropy {
    pub with_grad: bool,
}

impl SoftmaxCrossEntropy {
    /// CPU reference: (mean loss, dlogits).
    pub fn cpu(logits: &CpuTensor, labels: &[u32]) -> (f32, CpuTensor) {
        let (n, c) = (logits.shape[0], logits.shape[1]);
        let mut dlogits = CpuTensor::zeros(&logits.shape);
        let mut total = 0.0f64;
        for (row, &label) in labels.iter().enumerate() {
            let z = &logits.data[row * c..(row + 1) * c];
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total += lse - z[label as usize] as f64;
            for (j, &v) in z.iter().enumerate() {
                let onehot = if j == label as usize { 1.0 } else { 0.0 };
                dlogits.data[row * c + j] = (((v as f64 - lse).exp() - onehot) / n as f64) as f32;
            }
        }
        ((total / n as f64) as f32, dlogits)
    }
}

impl Op for SoftmaxCrossEntropy {
    fn describe(&self) -> String {
        "softmax cross-entropy".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let [logits, labels] = inputs else {
            bail!("cross-entropy takes logits and labels")
        };
        expect_rank(logits, 2, "logits")?;
        let n = logits.shape[0];
        if labels.shape != [n] || labels.dtype != DType::U32 {
            bail!(
                "labels must be u32 [{n}], got {:?} {:?}",
                labels.dtype,
                labels.shape
            );
        }
        let mut outputs = vec![(vec![n], DType::F32), (vec![n], DType::U32)];
        if self.with_grad {
            outputs.push((logits.shape.clone(), DType::F32));
        }
        Ok(outputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let shape = ctx.shape(inputs[0]);
        let p = XentParams {
            batch: shape[0] as u32,
            classes: shape[1] as u32,
            grad_scale: 1.0 / shape[0] as f32,
            _pad: 0,
        };
        // Inputs then outputs, in binding slots 1, 2, ...
        let slots: Vec<(u32, TensorId)> =
            (1..).zip(inputs.iter().chain(outputs).copied()).collect();
        let storage = ctx.bind(&slots);
        let entry = if self.with_grad {
            "forward_backward"
        } else {
            "forward"
        };
        ctx.dispatch(Shader::SoftmaxXent, entry, &p, &storage, shape[0])
    }
}

/// Adds a batch's loss sum, correct count and size to a 4-word metrics
/// tensor `[loss_sum (f32 bits), correct, seen, 0]` with a fixed-order tree.
#[derive(Debug)]
pub struct AccumulateMetrics;

impl Op for AccumulateMetrics {
    fn describe(&self) -> String {
        "accumulate metrics".into()
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("accumulate metrics writes into an existing tensor (Graph::apply_into)")
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let batch = ctx.shape(inputs[0])[0];
        let p = XentParams {
            batch: batch as u32,
            classes: 0,
            grad_scale: 0.0,
            _pad: 0,
        };
        let storage = ctx.bind(&[(3, inputs[0]), (4, inputs[1]), (6, outputs[0])]);
        ctx.dispatch_single(Shader::SoftmaxXent, "accumulate", &p, &storage)
    }
}

/// Adds a batch to a confusion matrix `[classes, classes]` (u32, row: true
/// label, column: prediction, the first maximum as torch.argmax). Inputs:
/// logits and labels; output (updated in place): the matrix.
#[derive(Debug)]
pub struct AccumulateConfusion;

impl Op for AccumulateConfusion {
    fn describe(&self) -> String {
        "accumulate confusion matrix".into()
    }

    fn infer(&self, _inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        bail!("the confusion matrix is updated in place (Graph::apply_into)")
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let shape = ctx.shape(inputs[0]);
        let p = XentParams {
            batch: shape[0] as u32,
            classes: shape[1] as u32,
            grad_scale: 0.0,
            _pad: 0,
        };
        let storage = ctx.bind(&[(1, inputs[0]), (2, inputs[1]), (7, outputs[0])]);
        ctx.dispatch_single(Shader::SoftmaxXent, "confusion_counts", &p, &storage)
    }
}
