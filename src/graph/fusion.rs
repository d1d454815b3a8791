//! Fusion at plan time: a convolution or linear layer whose output only an
//! activation reads computes the activation as it stores (the epilogue of
//! its kernel), so the pre-activation tensor is never written or kept.
//! Autodiff has run by then: the activation's backward reads its output,
//! not its input, so the backward nodes stay as they are.

use super::{Graph, Node, Storage};

/// The nodes to plan, fused, and for each tensor whether fusion left it
/// without a reader or writer (it then needs no memory).
pub fn fuse_activations(graph: &Graph) -> (Vec<Node>, Vec<bool>) {
    let mut readers = vec![0usize; graph.tensors.len()];
    let mut producer = vec![None; graph.tensors.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        for &t in &node.inputs {
            readers[t.0] += 1;
        }
        for &t in &node.outputs {
            producer[t.0] = Some(i);
        }
    }
    for t in &graph.tensors {
        if let Storage::View(of) | Storage::ChannelSlice { of, .. } = t.storage {
            readers[of.0] += 1;
        }
    }
    let mut nodes: Vec<Option<Node>> = graph.nodes.iter().cloned().map(Some).collect();
    let mut elided = vec![false; graph.tensors.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let Some(activation) = node.op.activation() else {
            continue;
        };
        let x = node.inputs[0];
        if graph.tensor(x).storage != Storage::Activation || readers[x.0] != 1 {
            continue;
        }
        let Some(j) = producer[x.0] else {
            continue;
        };
        let Some(Some(first)) = nodes.get(j) else {
            continue;
        };
        if first.outputs != [x] {
            continue;
        }
        let Some(fused) = first.op.with_activation(activation) else {
            continue;
        };
        nodes[j] = Some(Node {
            op: fused,
            inputs: first.inputs.clone(),
            outputs: node.outputs.clone(),
        });
        nodes[i] = None;
        elided[x.0] = true;
    }
    (nodes.into_iter().flatten().collect(), elided)
}
