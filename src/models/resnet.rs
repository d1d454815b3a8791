//! ResNet-18 as d2l's section 8.6 defines it for Fashion-MNIST.

use crate::nn::{
    BatchNorm, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, Residual, Sequential,
};

/// d2l's `resnet_block`: the first residual of every stage but the first
/// halves the resolution and changes the channel count.
fn resnet_block(channels: usize, residuals: usize, first_block: bool) -> Sequential {
    (0..residuals).fold(Sequential::new(), |block, i| {
        if i == 0 && !first_block {
            block.append(Residual::downsampling(channels, 2))
        } else {
            block.append(Residual::new(channels))
        }
    })
}

pub fn resnet18() -> Sequential {
    let stem = Sequential::new()
        .append(Conv2d::new(64, 7).stride(2).padding(3))
        .append(BatchNorm::new_2d())
        .append(ReLU)
        .append(MaxPool2d::new(3, 2).padding(1));
    Sequential::new()
        .append(stem)
        .append(resnet_block(64, 2, true))
        .append(resnet_block(128, 2, false))
        .append(resnet_block(256, 2, false))
        .append(resnet_block(512, 2, false))
        .append(GlobalAvgPool2d)
        .append(Flatten)
        .append(Linear::new(10))
}
