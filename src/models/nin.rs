//! Network in Network as d2l's section 8.3 defines it: no fully connected
//! layers; the last NiN block has one channel per class, averaged globally.

use crate::nn::{nin_block, Dropout, Flatten, GlobalAvgPool2d, MaxPool2d, Sequential};

pub fn nin() -> Sequential {
    Sequential::new()
        .append(nin_block(96, 11, 4, 0))
        .append(MaxPool2d::new(3, 2))
        .append(nin_block(256, 5, 1, 2))
        .append(MaxPool2d::new(3, 2))
        .append(nin_block(384, 3, 1, 1))
        .append(MaxPool2d::new(3, 2))
        .append(Dropout::new(0.5))
        .append(nin_block(10, 3, 1, 1))
        .append(GlobalAvgPool2d)
        .append(Flatten)
}
