//! d2l's reusable blocks: the pieces the models in `models/` are made of.

use super::{
    AvgPool2d, BatchNorm, Conv2d, ConvParameters, Dropout, Flatten, Linear, MaxPool2d, Module,
    ReLU, Sequential,
};
use crate::graph::{Graph, TensorId};
use crate::ops;
use anyhow::Result;

/// d2l's `nin_block`: a convolution followed by two 1x1 convolutions, each
/// with a ReLU (per-pixel fully connected layers).
pub fn nin_block(out_channels: usize, kernel: usize, stride: usize, padding: usize) -> Sequential {
    Sequential::new()
        .append(
            Conv2d::new(out_channels, kernel)
                .stride(stride)
                .padding(padding),
        )
        .append(ReLU)
        .append(Conv2d::new(out_channels, 1))
        .append(ReLU)
        .append(Conv2d::new(out_channels, 1))
        .append(ReLU)
}

/// d2l's `vgg_block`: `num_convs` 3x3 convolutions with ReLU, then a 2x2
/// max pool halving the resolution.
pub fn vgg_block(num_convs: usize, out_channels: usize) -> Sequential {
    (0..num_convs)
        .fold(Sequential::new(), |block, _| {
            block
                .append(Conv2d::new(out_channels, 3).padding(1))
                .append(ReLU)
        })
        .append(MaxPool2d::new(2, 2))
}

/// The classifier AlexNet and VGG end with: flatten, two 4096-wide fully
/// connected layers with ReLU and dropout 0.5, and the 10-class output.
pub fn dropout_classifier(features: Sequential) -> Sequential {
    features
        .append(Flatten)
        .append(Linear::new(4096))
        .append(ReLU)
        .append(Dropout::new(0.5))
        .append(Linear::new(4096))
        .append(ReLU)
        .append(Dropout::new(0.5))
        .append(Linear::new(10))
}

/// d2l's DenseNet `conv_block`: batch norm, ReLU, 3x3 convolution.
pub fn conv_block(out_channels: usize) -> Sequential {
    Sequential::new()
        .append(BatchNorm::new_2d())
        .append(ReLU)
        .append(Conv2d::new(out_channels, 3).padding(1))
}

/// d2l's DenseNet `transition_block`: batch norm, ReLU, 1x1 convolution to
/// `out_channels`, and a 2x2 average pool halving the resolution.
pub fn transition_block(out_channels: usize) -> Sequential {
    Sequential::new()
        .append(BatchNorm::new_2d())
        .append(ReLU)
        .append(Conv2d::new(out_channels, 1))
        .append(AvgPool2d::new(2, 2))
}

/// d2l's `Residual` block: two 3x3 convolutions with batch norm, added to
/// the input (through a strided 1x1 convolution when the shape changes).
pub struct Residual {
    channels: usize,
    use_1x1conv: bool,
    stride: usize,
}

impl Residual {
    pub fn new(channels: usize) -> Residual {
        Residual {
            channels,
            use_1x1conv: false,
            stride: 1,
        }
    }

    /// `Residual(channels, use_1x1conv=True, strides=stride)`.
    pub fn downsampling(channels: usize, stride: usize) -> Residual {
        Residual {
            channels,
            use_1x1conv: true,
            stride,
        }
    }
}

impl Module for Residual {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let c = self.channels;
        let conv1 = Conv2d::new(c, 3).padding(1).stride(self.stride);
        let y = conv1.forward(g, x, &format!("{prefix}conv1."))?;
        let y = BatchNorm::new_2d().forward(g, y, &format!("{prefix}bn1."))?;
        let y = ReLU.forward(g, y, prefix)?;
        let y = Conv2d::new(c, 3)
            .padding(1)
            .forward(g, y, &format!("{prefix}conv2."))?;
        let y = BatchNorm::new_2d().forward(g, y, &format!("{prefix}bn2."))?;
        let shortcut = if self.use_1x1conv {
            Conv2d::new(c, 1)
                .stride(self.stride)
                .forward(g, x, &format!("{prefix}conv3."))?
        } else {
            x
        };
        let sum = g.apply1(ops::Add, &[y, shortcut])?;
        ReLU.forward(g, sum, prefix)
    }

    fn class_name(&self) -> &'static str {
        "Residual"
    }
}

/// d2l's GoogLeNet `Inception` block: four parallel paths (1x1; 1x1 then
/// 3x3; 1x1 then 5x5; 3x3 max pool then 1x1), each ending in a ReLU that
/// writes straight into its channels of the concatenated output. The 1x1
/// convolutions that start the first three paths all read x: in training
/// they run as one `ParallelConv2d`, whose backward computes x's gradient
/// from all three in one product.
pub struct Inception {
    c1: usize,
    c2: (usize, usize),
    c3: (usize, usize),
    c4: usize,
}

impl Inception {
    pub fn new(c1: usize, c2: (usize, usize), c3: (usize, usize), c4: usize) -> Inception {
        Inception { c1, c2, c3, c4 }
    }
}

impl Module for Inception {
    fn forward(&self, g: &mut Graph, x: TensorId, prefix: &str) -> Result<TensorId> {
        let c_in = g.shape(x)[1];
        let mut layer = |conv: Conv2d, in_channels: usize, name: &str| {
            conv.parameters(g, in_channels, &format!("{prefix}{name}."))
        };
        // In PyTorch's state_dict order, which the initialisation follows.
        let p1_1 = layer(Conv2d::new(self.c1, 1), c_in, "p1_1");
        let p2_1 = layer(Conv2d::new(self.c2.0, 1), c_in, "p2_1");
        let p2_2 = layer(Conv2d::new(self.c2.1, 3).padding(1), self.c2.0, "p2_2");
        let p3_1 = layer(Conv2d::new(self.c3.0, 1), c_in, "p3_1");
        let p3_2 = layer(Conv2d::new(self.c3.1, 5).padding(2), self.c3.0, "p3_2");
        let p4_2 = layer(Conv2d::new(self.c4, 1), c_in, "p4_2");
        let conv_relu = |g: &mut Graph, conv: &ConvParameters, x: TensorId| {
            let y = conv.apply(g, x)?;
            ReLU.forward(g, y, prefix)
        };
        let (p1, p2, p3) = if g.training {
            let first_convs = ops::ParallelConv2d {
                conv: p1_1.op,
                activation: ops::Activation::Relu,
            };
            let inputs = [&p1_1, &p2_1, &p3_1].map(|conv| [conv.weight, conv.bias]);
            let paths = g.apply(first_convs, &[&[x][..], inputs.as_flattened()].concat())?;
            let p2 = conv_relu(g, &p2_2, paths[1])?;
            (paths[0], p2, conv_relu(g, &p3_2, paths[2])?)
        } else {
            // No backward to share; one path at a time, each path's first
            // output lives only until its second convolution has read it.
            let p1 = conv_relu(g, &p1_1, x)?;
            let p2 = conv_relu(g, &p2_1, x)?;
            let p2 = conv_relu(g, &p2_2, p2)?;
            let p3 = conv_relu(g, &p3_1, x)?;
            (p1, p2, conv_relu(g, &p3_2, p3)?)
        };
        let p4 = MaxPool2d::new(3, 1).padding(1).forward(g, x, prefix)?;
        let p4 = conv_relu(g, &p4_2, p4)?;
        g.concat(&[p1, p2, p3, p4])
    }

    fn class_name(&self) -> &'static str {
        "Inception"
    }
}

/// d2l's `DenseBlock`: `num_convs` conv blocks, each seeing the block input
/// and every earlier block's output concatenated along the channels. All of
/// them live in one buffer: each conv block writes its `growth_rate`
/// channels behind the ones before it.
pub struct DenseBlock {
    net: Sequential,
}

impl DenseBlock {
    pub fn new(num_convs: usize, growth_rate: usize) -> DenseBlock {
        let net = (0..num_convs).fold(Sequential::new(), |net, _| {
            net.append(conv_block(growth_rate))
        });
        DenseBlock { net }
    }
}

impl Module for DenseBlock {
    fn forward(&self, g: &mut Graph, mut x: TensorId, prefix: &str) -> Result<TensorId> {
        for (i, block) in self.net.layers().iter().enumerate() {
            let y = block.forward(g, x, &format!("{prefix}net.{i}."))?;
            x = g.concat(&[x, y])?;
        }
        Ok(x)
    }

    fn class_name(&self) -> &'static str {
        "DenseBlock"
    }
}
