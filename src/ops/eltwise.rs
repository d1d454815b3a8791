//! Elementwise ops: activations with their backward rules, and the gradient
//! sum autodiff inserts where a tensor feeds several nodes.

use super::{CpuTensor, LenParams};
use crate::gpu::Shader;
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

/// Records `entry` over every element of `out`, reading `(slot, tensor)` inputs.
fn elementwise(
    ctx: &mut PlanContext,
    entry: &'static str,
    inputs: &[(u32, TensorId)],
    out: TensorId,
) -> Result<()> {
    let len = ctx.graph.tensor(out).len();
    let mut storage: Vec<(u32, crate::graph::Binding)> = inputs
        .iter()
        .map(|&(slot, t)| (slot, ctx.binding(t).clone()))
        .collect();
    storage.push((4, ctx.binding(out).clone()));
    let refs: Vec<(u32, &crate::graph::Binding)> = storage.iter().map(|(s, b)| (*s, b)).collect();
    ctx.dispatch(Shader::Eltwise, entry, &LenParams::new(len), &refs, len)
}

fn same_shape(inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
    let first = &inputs[0].shape;
    if let Some(other) = inputs.iter().find(|t| &t.shape != first) {
        bail!("shapes differ: {first:?} and {:?}", other.shape);
    }
    Ok(vec![(first.clone(), DType::F32)])
}

/// `nn.Sigmoid`.
#[derive(Debug)]
pub struct Sigmoid;

impl Sigmoid {
    pub fn cpu_forward(x: &CpuTensor) -> CpuTensor {
        CpuTensor::new(
            &x.shape,
            x.data.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
        )
    }

    pub fn cpu_backward(y: &CpuTensor, dy: &CpuTensor) -> CpuTensor {
        CpuTensor::new(
            &y.shape,
            y.data
                .iter()
                .zip(&dy.data)
                .map(|(y, g)| g * y * (1.0 - y))
                .collect(),
        )
    }
}

impl Op for Sigmoid {
    fn describe(&self) -> String {
        "sigmoid".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        elementwise(ctx, "sigmoid_forward", &[(1, inputs[0])], outputs[0])
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
        Ok(vec![Some(g.apply1(SigmoidBackward, &[outputs[0], dy])?)])
    }
}

/// dx = dy * y * (1 - y), from the sigmoid's output y.
#[derive(Debug)]
pub struct SigmoidBackward;

impl Op for SigmoidBackward {
    fn describe(&self) -> String {
        "sigmoid backward".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        elementwise(
            ctx,
            "sigmoid_backward",
            &[(2, inputs[0]), (3, inputs[1])],
            outputs[0],
        )
    }
}

/// `nn.ReLU`.
#[derive(Debug)]
pub struct Relu;

impl Relu {
    pub fn cpu_forward(x: &CpuTensor) -> CpuTensor {
        CpuTensor::new(&x.shape, x.data.iter().map(|v| v.max(0.0)).collect())
    }

    pub fn cpu_backward(y: &CpuTensor, dy: &CpuTensor) -> CpuTensor {
        CpuTensor::new(
            &y.shape,
            y.data
                .iter()
                .zip(&dy.data)
                .map(|(y, g)| if *y > 0.0 { *g } else { 0.0 })
                .collect(),
        )
    }
}

impl Op for Relu {
    fn describe(&self) -> String {
        "relu".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        elementwise(ctx, "relu_forward", &[(1, inputs[0])], outputs[0])
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
        Ok(vec![Some(g.apply1(ReluBackward, &[outputs[0], dy])?)])
    }
}

/// dx = dy where the ReLU's output is positive, else 0.
#[derive(Debug)]
pub struct ReluBackward;

impl Op for ReluBackward {
    fn describe(&self) -> String {
        "relu backward".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        elementwise(
            ctx,
            "relu_backward",
            &[(2, inputs[0]), (3, inputs[1])],
            outputs[0],
        )
    }
}

/// `a + b`; its gradient flows unchanged to both inputs.
#[derive(Debug)]
pub struct Add;

impl Op for Add {
    fn describe(&self) -> String {
        "add".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        same_shape(inputs)
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        elementwise(ctx, "add", &[(1, inputs[0]), (2, inputs[1])], outputs[0])
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
