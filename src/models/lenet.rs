//! LeNet-5 as d2l's section 7.6 defines it (sigmoid activations, average pooling).

use crate::nn::{AvgPool2d, Conv2d, Flatten, Linear, Sequential, Sigmoid};

pub fn lenet() -> Sequential {
    Sequential::new()
        .add(Conv2d::new(6, 5).padding(2))
        .add(Sigmoid)
        .add(AvgPool2d::new(2, 2))
        .add(Conv2d::new(16, 5))
        .add(Sigmoid)
        .add(AvgPool2d::new(2, 2))
        .add(Flatten)
        .add(Linear::new(120))
        .add(Sigmoid)
        .add(Linear::new(84))
        .add(Sigmoid)
        .add(Linear::new(10))
}
