//! Layer builders in the shape of `torch.nn`: each adds its nodes and its
//! parameters (named like PyTorch's `state_dict` keys) to a graph.

use crate::graph::{DType, Graph, Init, TensorId};
use crate::ops;
use anyhow::{Context, Result};

mod blocks;
pub use blocks::{
    conv_block, dropout_classifier, nin_block, transition_block, vgg_block, DenseBlock, Inception,
    Residual,
};

/// A layer or block. `prefix` is its `state_dict` path, e.g. `"3."`.
pub trait Module {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId>;

    /// The PyTorch class name, as d2l's `layer_summary` prints it.
    fn class_name(&self) -> &'static str;
}

/// `nn.Sequential`: children named `0`, `1`, ... in order.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Module>>,
}

impl Sequential {
    pub fn new() -> Sequential {
        Sequential::default()
    }

    pub fn append(mut self, layer: impl Module + 'static) -> Sequential {
        self.layers.push(Box::new(layer));
        self
    }

    pub fn layers(&self) -> &[Box<dyn Module>] {
        &self.layers
    }
}

impl Module for Sequential {
    fn forward(&self, g: &mut Graph, mut x: TensorId, prefix: &str) -> Result<TensorId> {
        for (i, layer) in self.layers.iter().enumerate() {
            let name = format!("{prefix}{i}");
            x = layer.forward(g, x, &format!("{name}.")).with_context(|| {
                format!(
                    "layer {name} ({}) with input {:?}",
                    layer.class_name(),
                    g.shape(x)
                )
            })?;
        }
        Ok(x)
    }

    fn class_name(&self) -> &'static str {
        "Sequential"
    }
}

/// `nn.LazyConv2d(out_channels, kernel_size, stride, padding)`: the input
/// channel count comes from the input, as in d2l.
pub struct Conv2d {
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(out_channels: usize, kernel: usize) -> Conv2d {
        Conv2d {
            out_channels,
            kernel,
            stride: 1,
            padding: 0,
        }
    }

    pub fn stride(self, stride: usize) -> Conv2d {
        Conv2d { stride, ..self }
    }

    pub fn padding(self, padding: usize) -> Conv2d {
        Conv2d { padding, ..self }
    }

    /// Creates the layer's weight and bias for `in_channels` input channels
    /// under `prefix`, to apply later (a block whose convolutions do not
    /// run in the order PyTorch registers them).
    pub fn parameters(&self, g: &mut Graph, in_channels: usize, prefix: &str) -> ConvParameters {
        let (k, out) = (self.kernel, self.out_channels);
        let weight = g.param(
            format!("{prefix}weight"),
            vec![out, in_channels, k, k],
            Init::XavierUniform,
        );
        let bias = g.param(format!("{prefix}bias"), vec![out], Init::Zeros);
        let op = ops::Conv2d {
            stride: (self.stride, self.stride),
            padding: (self.padding, self.padding),
        };
        ConvParameters { op, weight, bias }
    }
}

/// A convolution layer's parameters and the op that applies them.
pub struct ConvParameters {
    pub op: ops::Conv2d,
    pub weight: TensorId,
    pub bias: TensorId,
}

impl ConvParameters {
    /// The convolution of `x`; a 1x1 one with stride 2 as the pool that
    /// picks x's even pixels and a pointwise one over them, where that
    /// runs faster (`ops::Conv2d::on_even_pixels`).
    pub fn apply(&self, g: &mut Graph, x: TensorId) -> Result<TensorId> {
        let even_pixels = self.op.on_even_pixels(g.shape(x), g.shape(self.weight));
        if let Some((pool, pointwise)) = even_pixels {
            let x = g.apply1(pool, &[x])?;
            return g.apply1(pointwise, &[x, self.weight, self.bias]);
        }
        g.apply1(self.op, &[x, self.weight, self.bias])
    }
}

impl Module for Conv2d {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let in_channels = g.shape(x)[1];
        self.parameters(g, in_channels, prefix).apply(g, x)
    }

    fn class_name(&self) -> &'static str {
        "Conv2d"
    }
}

/// `nn.LazyLinear(out_features)`.
pub struct Linear {
    out_features: usize,
}

impl Linear {
    pub fn new(out_features: usize) -> Linear {
        Linear { out_features }
    }
}

impl Module for Linear {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let in_features = g.shape(x)[1];
        let weight = g.param(
            format!("{prefix}weight"),
            vec![self.out_features, in_features],
            Init::XavierUniform,
        );
        let bias = g.param(
            format!("{prefix}bias"),
            vec![self.out_features],
            Init::Zeros,
        );
        g.apply1(ops::Linear, &[x, weight, bias])
    }

    fn class_name(&self) -> &'static str {
        "Linear"
    }
}

/// `nn.LazyBatchNorm1d()` / `nn.LazyBatchNorm2d()`: gamma 1, beta 0,
/// running mean 0 and variance 1; the channel count comes from the input.
pub struct BatchNorm {
    class_name: &'static str,
}

impl BatchNorm {
    pub fn new_1d() -> BatchNorm {
        BatchNorm {
            class_name: "BatchNorm1d",
        }
    }

    pub fn new_2d() -> BatchNorm {
        BatchNorm {
            class_name: "BatchNorm2d",
        }
    }
}

impl Module for BatchNorm {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let c = vec![g.shape(x)[1]];
        let gamma = g.param(format!("{prefix}weight"), c.clone(), Init::Ones);
        let beta = g.param(format!("{prefix}bias"), c.clone(), Init::Zeros);
        let mean = g.state(format!("{prefix}running_mean"), c.clone(), Init::Zeros);
        let var = g.state(format!("{prefix}running_var"), c, Init::Ones);
        let norm = ops::BatchNorm::new(g.training);
        g.apply1(norm, &[x, gamma, beta, mean, var])
    }

    fn class_name(&self) -> &'static str {
        self.class_name
    }
}

/// `nn.Dropout(p)`: inverted dropout in training, the identity in
/// evaluation (and when p is 0).
pub struct Dropout {
    p: f32,
}

impl Dropout {
    pub fn new(p: f32) -> Dropout {
        Dropout { p }
    }
}

/// FNV-1a of the layer's name: a per-layer salt for dropout masks.
fn salt(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Module for Dropout {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let p = g.dropout_override.unwrap_or(self.p);
        if !g.training || p == 0.0 {
            return Ok(x);
        }
        let rng = g.external(DROPOUT_RNG, vec![2], DType::U32);
        g.apply1(
            ops::Dropout {
                p,
                salt: salt(prefix),
            },
            &[x, rng],
        )
    }

    fn class_name(&self) -> &'static str {
        "Dropout"
    }
}

/// The external tensor holding dropout's random stream `[seed, step]`.
pub const DROPOUT_RNG: &str = "dropout_rng";

/// `nn.Sigmoid()`.
pub struct Sigmoid;

impl Module for Sigmoid {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        g.apply1(ops::Activation::Sigmoid, &[x])
    }

    fn class_name(&self) -> &'static str {
        "Sigmoid"
    }
}

/// `nn.ReLU()`.
pub struct ReLU;

impl Module for ReLU {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        g.apply1(ops::Activation::Relu, &[x])
    }

    fn class_name(&self) -> &'static str {
        "ReLU"
    }
}

/// `nn.AvgPool2d(kernel_size, stride)`.
pub struct AvgPool2d(pub ops::AvgPool2d);

impl AvgPool2d {
    pub fn new(kernel: usize, stride: usize) -> AvgPool2d {
        AvgPool2d(ops::AvgPool2d::new(kernel, stride))
    }
}

impl Module for AvgPool2d {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        g.apply1(self.0, &[x])
    }

    fn class_name(&self) -> &'static str {
        "AvgPool2d"
    }
}

/// `nn.MaxPool2d(kernel_size, stride, padding)`.
pub struct MaxPool2d(pub ops::MaxPool2d);

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize) -> MaxPool2d {
        MaxPool2d(ops::MaxPool2d(ops::PoolWindow::new(kernel, stride)))
    }

    pub fn padding(self, padding: usize) -> MaxPool2d {
        MaxPool2d(ops::MaxPool2d(self.0 .0.padding(padding)))
    }
}

impl Module for MaxPool2d {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        g.apply1(self.0, &[x])
    }

    fn class_name(&self) -> &'static str {
        "MaxPool2d"
    }
}

/// `nn.AdaptiveAvgPool2d((1, 1))`: the mean of each channel's plane.
pub struct GlobalAvgPool2d;

impl Module for GlobalAvgPool2d {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        let (h, w) = (g.shape(x)[2], g.shape(x)[3]);
        let whole_plane = ops::PoolWindow {
            kernel: (h, w),
            stride: (h, w),
            padding: (0, 0),
        };
        g.apply1(ops::AvgPool2d(whole_plane), &[x])
    }

    fn class_name(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
}

/// `nn.Flatten()`.
pub struct Flatten;

impl Module for Flatten {
    fn forward(&self, g: &mut Graph, x: TensorId, _prefix: &str) -> Result<TensorId> {
        let flatten = ops::Reshape::flatten(g.shape(x));
        g.apply1(flatten, &[x])
    }

    fn class_name(&self) -> &'static str {
        "Flatten"
    }
}
