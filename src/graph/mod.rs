//! The computation graph: tensors with shapes, a node list in execution
//! order, reverse-mode autodiff and the executor that turns a graph into a
//! replayable GPU plan.

pub mod autodiff;
pub mod executor;
pub mod params;

pub use executor::{Binding, Dispatch, Externals, Plan, PlanContext};
pub use params::ParamStore;

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

    /// Creates the op's pipelines, uniforms and bind groups (once per plan).
    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()>;

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

#[derive(Debug)]
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

    /// The tensor whose bytes `id` uses, following views.
    pub fn storage_root(&self, mut id: TensorId) -> TensorId {
        while let Storage::View(source) = self.tensor(id).storage {
            id = source;
        }
        id
    }
}
