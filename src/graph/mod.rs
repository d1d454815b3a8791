//! The computation graph: tensors with shapes, a node list in execution
//! order, reverse-mode autodiff and the executor that turns a graph into a
//! replayable GPU plan.

pub mod autodiff;
pub mod executor;
mod fusion;
pub mod params;

pub use executor::{Binding, Dispatch, Externals, NodeCost, NodeTime, Plan, PlanContext};
pub use params::ParamStore;

use crate::ops::Activation;
use anyhow::{bail, Result};
use std::rc::Rc;

pub type Shape = Vec<usize>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U32,
    /// Bytes packed four to a 32-bit word (the u8 dataset).
    U8,
}

impl DType {
    pub fn bytes(self, elements: usize) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4 * elements as u64,
            DType::U8 => elements as u64,
        }
    }
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A region of the plan's own activation memory.
    Activation,
    /// Parameter `i` of the graph, in the shared parameter store.
    Parameter(usize),
    /// The gradient of parameter `i`, in the shared gradient store.
    Gradient(usize),
    /// Non-trainable state `i` (BatchNorm running statistics), in the
    /// shared state buffer: what PyTorch calls a module's buffers.
    State(usize),
    /// A buffer the caller provides when planning (dataset, batch indices, metrics).
    External(&'static str),
    /// The same bytes as another tensor (reshape/flatten: no copy).
    View(TensorId),
    /// Channels `channel..channel + C` of a 4-D tensor with more channels:
    /// a branch of a concatenation writes here directly, and the gradient
    /// of a concatenated input is the matching slice of the output's.
    ChannelSlice { of: TensorId, channel: usize },
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Shape,
    pub dtype: DType,
    pub storage: Storage,
    pub requires_grad: bool,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.len())
    }

    /// Elements per sample: all of them for a tensor without a batch dimension.
    pub fn sample_len(&self) -> usize {
        self.shape
            .first()
            .map_or(self.len(), |&n| self.len() / n.max(1))
    }
}

/// Where a tensor's samples lie in its buffer: sample `n` is the elements
/// from `offset + n * sample_stride` on, in row-major order. Contiguous
/// tensors have `sample_stride` = elements per sample; a channel slice of a
/// concatenation keeps the whole concatenation's stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub offset: usize,
    pub sample_stride: usize,
}

/// How a parameter starts (d2l's `init_cnn`: Xavier-uniform weights, zero
/// biases; BatchNorm gamma 1, beta 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    XavierUniform,
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// The PyTorch `state_dict` key, e.g. `0.weight`.
    pub name: String,
    pub shape: Shape,
    pub init: Init,
}

/// One op in the graph. Forward ops know their backward rule; backward ops
/// (conv backward-data, ...) are ops like any other.
pub trait Op: std::fmt::Debug {
    /// Short description for logs and errors, e.g. `conv2d 5x5 s1 p2`.
    fn describe(&self) -> String;

    /// Shapes and types of the outputs, or an error saying why the inputs do not fit.
    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>>;

    /// True when the single output shares its input's bytes (no GPU work).
    fn is_view(&self) -> bool {
        false
    }

    /// For ops whose every output sample depends only on the same sample
    /// of the inputs: the inputs that are not batched (weights, biases).
    /// The executor may then plan the op on chunks of the batch. `None`:
    /// the op needs the whole batch at once (or chunks it itself).
    fn shared_inputs(&self) -> Option<&'static [usize]> {
        None
    }

    /// True when the op's kernels address every (N, ...) tensor through
    /// `PlanContext::layout`, so that any of them may be a channel slice.
    /// Ops the executor may plan in batch chunks must do so anyway.
    fn handles_channel_slices(&self) -> bool {
        self.shared_inputs().is_some()
    }

    /// Floating-point operations of one run, counted as PyTorch's
    /// FlopCounterMode does: 2 per multiply-add of convolutions and matrix
    /// products (their gradients included), nothing for other ops.
    fn flops(&self, _inputs: &[&Tensor], _outputs: &[&Tensor]) -> u64 {
        0
    }

    /// Creates the op's pipelines, uniforms and bind groups (once per plan).
    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()>;

    /// Which activation this op is, if it is one.
    fn activation(&self) -> Option<Activation> {
        None
    }

    /// This op with `activation` applied to its (first) output as its
    /// kernels store it, where they can (convolutions, linear layers, batch
    /// norm, sums); see `fusion`.
    fn with_activation(&self, _activation: Activation) -> Option<Rc<dyn Op>> {
        None
    }

    /// Which activation's backward this op is, if it is one (inputs: the
    /// activation's output y, then dy).
    fn activation_backward(&self) -> Option<Activation> {
        None
    }

    /// This op followed by `activation`'s backward, with the activation's
    /// output as one more input, where its kernels can (pooling gradients,
    /// convolution data gradients, sums); see `fusion`.
    fn with_activation_backward(&self, _activation: Activation) -> Option<Rc<dyn Op>> {
        None
    }

    /// Whether this op is the sum of its two inputs (`Add`).
    fn is_sum(&self) -> bool {
        false
    }

    /// This op with one more input added to its (single) output as its
    /// kernels store it, where they can (batch norm's data gradient); see
    /// `fusion`.
    fn with_addend(&self) -> Option<Rc<dyn Op>> {
        None
    }

    /// Adds the nodes computing the input gradients from the output
    /// gradients; `needs[i]` says whether input `i` wants one.
    fn backward(
        &self,
        _g: &mut Graph,
        _inputs: &[TensorId],
        _outputs: &[TensorId],
        _output_grads: &[Option<TensorId>],
        _needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        bail!("{} has no gradient", self.describe())
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Rc<dyn Op>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

#[derive(Debug, Default)]
pub struct Graph {
    pub tensors: Vec<Tensor>,
    pub nodes: Vec<Node>,
    pub params: Vec<ParamSpec>,
    /// Non-trainable state, also named by `state_dict` key.
    pub state: Vec<ParamSpec>,
    /// Training mode (batch statistics, dropout) or evaluation mode.
    pub training: bool,
    /// `--dropout P`: replaces every dropout layer's probability.
    pub dropout_override: Option<f32>,
    /// Lets activations whose lifetimes do not overlap share a buffer; a
    /// graph whose intermediate tensors are read after a run must not.
    pub reuse_activations: bool,
}

impl Graph {
    pub fn new(training: bool) -> Graph {
        Graph {
            training,
            ..Graph::default()
        }
    }

    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id.0]
    }

    pub fn shape(&self, id: TensorId) -> &[usize] {
        &self.tensors[id.0].shape
    }

    fn add_tensor(
        &mut self,
        shape: Shape,
        dtype: DType,
        storage: Storage,
        requires_grad: bool,
    ) -> TensorId {
        self.tensors.push(Tensor {
            shape,
            dtype,
            storage,
            requires_grad,
        });
        TensorId(self.tensors.len() - 1)
    }

    /// A tensor whose buffer the caller supplies at plan time under `key`.
    pub fn external(&mut self, key: &'static str, shape: Shape, dtype: DType) -> TensorId {
        self.add_tensor(shape, dtype, Storage::External(key), false)
    }

    /// A tensor in the plan's activation memory that the caller writes
    /// directly (tests feed inputs this way).
    pub fn input(&mut self, shape: Shape, dtype: DType) -> TensorId {
        self.add_tensor(shape, dtype, Storage::Activation, false)
    }

    /// Like `input`, but autodiff computes its gradient (PyTorch's
    /// `requires_grad=True` on a plain tensor); tests use it for dx.
    pub fn leaf(&mut self, shape: Shape) -> TensorId {
        self.add_tensor(shape, DType::F32, Storage::Activation, true)
    }

    /// A trainable parameter named by its PyTorch `state_dict` key.
    pub fn param(&mut self, name: String, shape: Shape, init: Init) -> TensorId {
        let index = self.params.len();
        self.params.push(ParamSpec {
            name,
            shape: shape.clone(),
            init,
        });
        self.add_tensor(shape, DType::F32, Storage::Parameter(index), true)
    }

    /// Non-trainable state named by its PyTorch `state_dict` key
    /// (`1.running_mean`); ops may update it in place.
    pub fn state(&mut self, name: String, shape: Shape, init: Init) -> TensorId {
        let index = self.state.len();
        self.state.push(ParamSpec {
            name,
            shape: shape.clone(),
            init,
        });
        self.add_tensor(shape, DType::F32, Storage::State(index), false)
    }

    /// Appends `op` applied to `inputs`, creating its outputs.
    pub fn apply(&mut self, op: impl Op + 'static, inputs: &[TensorId]) -> Result<Vec<TensorId>> {
        let specs = {
            let tensors: Vec<&Tensor> = inputs.iter().map(|&t| self.tensor(t)).collect();
            op.infer(&tensors)?
        };
        let requires_grad = inputs.iter().any(|&t| self.tensor(t).requires_grad);
        let view_of = op.is_view().then(|| inputs[0]);
        let outputs: Vec<TensorId> = specs
            .into_iter()
            .map(|(shape, dtype)| {
                let storage = match view_of {
                    Some(source) => Storage::View(source),
                    None => Storage::Activation,
                };
                self.add_tensor(shape, dtype, storage, requires_grad && dtype == DType::F32)
            })
            .collect();
        self.nodes.push(Node {
            op: Rc::new(op),
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
        });
        Ok(outputs)
    }

    /// `apply` for ops with exactly one output.
    pub fn apply1(&mut self, op: impl Op + 'static, inputs: &[TensorId]) -> Result<TensorId> {
        Ok(self.apply(op, inputs)?[0])
    }

    /// Appends `op` writing into tensors that already exist (in-place
    /// accumulation such as the running metrics).
    pub fn apply_into(&mut self, op: impl Op + 'static, inputs: &[TensorId], outputs: &[TensorId]) {
        self.nodes.push(Node {
            op: Rc::new(op),
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        });
    }

    /// The tensor whose buffer `id` uses, following views and slices.
    pub fn storage_root(&self, mut id: TensorId) -> TensorId {
        loop {
            match self.tensor(id).storage {
                Storage::View(source) | Storage::ChannelSlice { of: source, .. } => id = source,
                _ => return id,
            }
        }
    }

    /// True when `id`'s samples are not contiguous in its buffer: a channel
    /// slice, or a view of one.
    pub fn is_channel_slice(&self, mut id: TensorId) -> bool {
        loop {
            match self.tensor(id).storage {
                Storage::ChannelSlice { .. } => return true,
                Storage::View(source) => id = source,
                _ => return false,
            }
        }
    }

    /// Where `id`'s samples lie in its buffer.
    pub fn layout(&self, id: TensorId) -> Layout {
        let t = self.tensor(id);
        let contiguous = Layout {
            offset: 0,
            sample_stride: t.sample_len(),
        };
        match t.storage {
            Storage::ChannelSlice { of, channel } => {
                let parent = self.layout(of);
                let plane: usize = t.shape[2..].iter().product();
                Layout {
                    offset: parent.offset + channel * plane,
                    sample_stride: parent.sample_stride,
                }
            }
            Storage::View(source) if self.is_channel_slice(source) => self.layout(source),
            _ => contiguous,
        }
    }

    /// A tensor that is channels `channel..channel + channels` of `of` (N, C, H, W).
    pub fn channel_slice(&mut self, of: TensorId, channel: usize, channels: usize) -> TensorId {
        let mut shape = self.shape(of).to_vec();
        shape[1] = channels;
        self.add_tensor(
            shape,
            DType::F32,
            Storage::ChannelSlice { of, channel },
            false,
        )
    }

    /// `torch.cat(inputs, dim=1)` without a copy: the output is allocated
    /// once and every input becomes a slice of it, so the ops producing the
    /// inputs write straight into their channels.
    pub fn concat(&mut self, inputs: &[TensorId]) -> Result<TensorId> {
        let first = self.shape(inputs[0]).to_vec();
        let mut channels = 0;
        for &t in inputs {
            let tensor = self.tensor(t);
            let shape = &tensor.shape;
            if shape.len() != 4
                || tensor.dtype != DType::F32
                || shape[0] != first[0]
                || shape[2..] != first[2..]
            {
                bail!(
                    "concatenation needs f32 (N, C, H, W) tensors that differ only in C, got {first:?} and {shape:?}"
                );
            }
            if tensor.storage != Storage::Activation {
                bail!(
                    "a {shape:?} tensor stored as {:?} cannot become part of a concatenation \
                     (only an op's own output can, and only once)",
                    tensor.storage
                );
            }
            channels += shape[1];
        }
        let requires_grad = inputs.iter().any(|&t| self.tensor(t).requires_grad);
        let shape = vec![first[0], channels, first[2], first[3]];
        let out = self.add_tensor(shape, DType::F32, Storage::Activation, requires_grad);
        let mut channel = 0;
        for &t in inputs {
            self.tensors[t.0].storage = Storage::ChannelSlice { of: out, channel };
            channel += self.shape(t)[1];
        }
        self.nodes.push(Node {
            op: Rc::new(crate::ops::Concat),
            inputs: inputs.to_vec(),
            outputs: vec![out],
        });
        Ok(out)
    }
}
