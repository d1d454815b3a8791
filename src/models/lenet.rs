//! LeNet-5 as d2l's section 7.6 defines it (sigmoid activations, average pooling).

use crate::nn::{AvgPool2d, Conv2d, Flatten, Linear, Sequential, Sigmoid};

pub fn lenet() -> Sequential {
    Sequential::new()
        .append(Conv2d::new(6, 5).padding(2))
        .append(Sigmoid)
        .append(AvgPool2d::new(2, 2))
        .append(Conv2d::new(16, 5))
        .append(Sigmoid)
        .append(AvgPool2d::new(2, 2))
        .append(Flatten)
        .append(Linear::new(120))
        .append(Sigmoid)
        .append(Linear::new(84))
        .append(Sigmoid)
        .append(Linear::new(10))
}
