//! Reverse-mode autodiff: walks the forward nodes backwards and appends the
//! nodes each op's backward rule asks for.

use super::{Graph, Storage, TensorId};
use crate::ops::Add;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Appends the backward graph for the given (tensor, gradient) seeds. Every
/// parameter's gradient is placed in the gradient store (`Storage::Gradient`),
/// where the optimizer finds it. Returns the gradient of every tensor that got one.
pub fn backward(
    g: &mut Graph,
    seeds: &[(TensorId, TensorId)],
) -> Result<HashMap<TensorId, TensorId>> {
    let mut grads: HashMap<TensorId, TensorId> = seeds.iter().copied().collect();
    for index in (0..g.nodes.len()).rev() {
        let node = &g.nodes[index];
        let output_grads: Vec<Option<TensorId>> =
            node.outputs.iter().map(|t| grads.get(t).copied()).collect();
        let needs: Vec<bool> = node
            .inputs
            .iter()
            .map(|&t| g.tensor(t).requires_grad)
            .collect();
        if output_grads.iter().all(Option::is_none) || !needs.contains(&true) {
            continue;
        }
        let (op, inputs, outputs) = (node.op.clone(), node.inputs.clone(), node.outputs.clone());
        let input_grads = op.backward(g, &inputs, &outputs, &output_grads, &needs)?;
        for ((&input, grad), need) in inputs.iter().zip(input_grads).zip(needs) {
            let Some(grad) = grad.filter(|_| need) else {
                continue;
            };
            let total = match grads.get(&input) {
                // A tensor read by several nodes: its gradient is the sum.
                Some(&earlier) => g.apply1(Add, &[earlier, grad])?,
                None => grad,
            };
            grads.insert(input, total);
        }
    }
    for index in 0..g.tensors.len() {
        let Storage::Parameter(param) = g.tensors[index].storage else {
            continue;
        };
        let Some(&grad) = grads.get(&TensorId(index)) else {
            continue;
        };
        if g.tensors[grad.0].storage != Storage::Activation {
            bail!(
                "the gradient of parameter {} is not a plain tensor ({:?})",
                g.params[param].name,
                g.tensors[grad.0].storage
            );
        }
        g.tensors[grad.0].storage = Storage::Gradient(param);
    }
    Ok(grads)
}
