//! LeNet with batch normalisation after every convolution and hidden
//! linear layer, as d2l's section 8.5 defines it (concise version).

use crate::nn::{AvgPool2d, BatchNorm, Conv2d, Flatten, Linear, Sequential, Sigmoid};

pub fn lenet_bn() -> Sequential {
    Sequential::new()
        .append(Conv2d::new(6, 5))
        .append(BatchNorm::new_2d())
        .append(Sigmoid)
        .append(AvgPool2d::new(2, 2))
        .append(Conv2d::new(16, 5))
        .append(BatchNorm::new_2d())
        .append(Sigmoid)
        .append(AvgPool2d::new(2, 2))
        .append(Flatten)
        .append(Linear::new(120))
        .append(BatchNorm::new_1d())
        .append(Sigmoid)
        .append(Linear::new(84))
        .append(BatchNorm::new_1d())
        .append(Sigmoid)
        .append(Linear::new(10))
}
