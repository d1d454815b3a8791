//! Fusion at plan time, after autodiff has added the backward nodes.
//!
//! Forward: a convolution, linear layer, batch norm or sum whose output only
//! an activation reads applies the activation as it stores (the epilogue of
//! its kernel), so the pre-activation tensor is never written or kept. The
//! activation's backward reads its output, not its input, so the backward
//! nodes stay as they are.
//!
//! Backward: a pooling gradient, a convolution's data gradient or a sum of
//! gradients that only an activation's backward reads carries the gradient
//! on through the activation as it stores, reading the activation's output,
//! so the gradient at the activation's output is never written or kept. A sum
//! of two gradients (a tensor read twice) whose one addend is batch norm's
//! data gradient, read by nothing else, is added as that gradient is stored
//! (DenseNet's concatenations).

use super::{Graph, Node, Op, Storage, TensorId};
use std::rc::Rc;

/// The nodes to plan, fused, and for each tensor whether fusion left it
/// without a reader or writer (it then needs no memory).
pub fn fuse_activations(graph: &Graph) -> (Vec<Node>, Vec<bool>) {
    let mut fusion = Fusion::new(graph);
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Some(activation) = node.op.activation() {
            // Further outputs (batch norm's saved statistics) stay as they are.
            fusion.merge_with_producer(i, node.inputs[0], |first| {
                let fused = first.op.with_activation(activation)?;
                let outputs = [&node.outputs[..], &first.outputs[1..]].concat();
                Some((fused, first.inputs.clone(), outputs))
            });
        } else if let Some(activation) = node.op.activation_backward() {
            let (y, dy) = (node.inputs[0], node.inputs[1]);
            fusion.merge_with_producer(i, dy, |first| {
                let fused = first.op.with_activation_backward(activation)?;
                (first.outputs.len() == 1).then(|| {
                    (
                        fused,
                        [&first.inputs[..], &[y]].concat(),
                        node.outputs.clone(),
                    )
                })
            });
        } else if node.op.is_sum() {
            // Autodiff adds the newer gradient second: try it first.
            let (a, b) = (node.inputs[0], node.inputs[1]);
            [(b, a), (a, b)].into_iter().any(|(t, addend)| {
                fusion.merge_with_producer(i, t, |first| {
                    let fused = first.op.with_addend()?;
                    (first.outputs.len() == 1).then(|| {
                        (
                            fused,
                            [&first.inputs[..], &[addend]].concat(),
                            node.outputs.clone(),
                        )
                    })
                })
            });
        }
    }
    let nodes = fusion.nodes.into_iter().flatten().collect();
    (nodes, fusion.elided)
}

struct Fusion<'a> {
    graph: &'a Graph,
    /// Nodes reading each tensor, views and slices of it counted as readers.
    readers: Vec<usize>,
    producer: Vec<Option<usize>>,
    nodes: Vec<Option<Node>>,
    elided: Vec<bool>,
}

impl Fusion<'_> {
    fn new(graph: &Graph) -> Fusion<'_> {
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
        Fusion {
            graph,
            readers,
            producer,
            nodes: graph.nodes.iter().cloned().map(Some).collect(),
            elided: vec![false; graph.tensors.len()],
        }
    }

    /// Replaces node `i` and the producer of its input `t` by one node,
    /// `fuse(producer)`'s (op, inputs, outputs), when only node `i` reads
    /// `t`, `t` is the producer's first output, `fuse` gives one, and every
    /// input of it exists where the producer runs. Says whether it did.
    fn merge_with_producer(
        &mut self,
        i: usize,
        t: TensorId,
        fuse: impl FnOnce(&Node) -> Option<(Rc<dyn Op>, Vec<TensorId>, Vec<TensorId>)>,
    ) -> bool {
        if self.graph.tensor(t).storage != Storage::Activation || self.readers[t.0] != 1 {
            return false;
        }
        let Some(j) = self.producer[t.0] else {
            return false;
        };
        let Some(first) = &self.nodes[j] else {
            return false;
        };
        if first.outputs[0] != t {
            return false;
        }
        let Some((op, inputs, outputs)) = fuse(first) else {
            return false;
        };
        if inputs.iter().any(|u| self.written_after(*u, j)) {
            return false;
        }
        self.nodes[j] = Some(Node {
            op,
            inputs,
            outputs,
        });
        self.nodes[i] = None;
        self.elided[t.0] = true;
        true
    }

    /// Whether the node that writes tensor `t` runs after node `j`: its
    /// producer, or where it has none (a gradient's slice, a view) the
    /// writer of the tensor it is a slice or view of. A concatenated
    /// branch's own producer writes it, not the concatenation's node after.
    fn written_after(&self, mut t: TensorId, j: usize) -> bool {
        loop {
            if let Some(k) = self.producer[t.0] {
                return k > j;
            }
            match self.graph.tensor(t).storage {
                Storage::View(of) | Storage::ChannelSlice { of, .. } => t = of,
                _ => return false,
            }
        }
    }
}
