//! GoogLeNet as d2l's section 8.4 defines it: five stages b1..b5, nine
//! Inception blocks, and a linear classifier.

use crate::nn::{Conv2d, Flatten, GlobalAvgPool2d, Inception, Linear, MaxPool2d, ReLU, Sequential};

fn halving_max_pool() -> MaxPool2d {
    MaxPool2d::new(3, 2).padding(1)
}

pub fn googlenet() -> Sequential {
    let b1 = Sequential::new()
        .append(Conv2d::new(64, 7).stride(2).padding(3))
        .append(ReLU)
        .append(halving_max_pool());
    let b2 = Sequential::new()
        .append(Conv2d::new(64, 1))
        .append(ReLU)
        .append(Conv2d::new(192, 3).padding(1))
        .append(ReLU)
        .append(halving_max_pool());
    let b3 = Sequential::new()
        .append(Inception::new(64, (96, 128), (16, 32), 32))
        .append(Inception::new(128, (128, 192), (32, 96), 64))
        .append(halving_max_pool());
    let b4 = Sequential::new()
        .append(Inception::new(192, (96, 208), (16, 48), 64))
        .append(Inception::new(160, (112, 224), (24, 64), 64))
        .append(Inception::new(128, (128, 256), (24, 64), 64))
        .append(Inception::new(112, (144, 288), (32, 64), 64))
        .append(Inception::new(256, (160, 320), (32, 128), 128))
        .append(halving_max_pool());
    let b5 = Sequential::new()
        .append(Inception::new(256, (160, 320), (32, 128), 128))
        .append(Inception::new(384, (192, 384), (48, 128), 128))
        .append(GlobalAvgPool2d)
        .append(Flatten);
    Sequential::new()
        .append(b1)
        .append(b2)
        .append(b3)
        .append(b4)
        .append(b5)
        .append(Linear::new(10))
}
