//! DenseNet as d2l's section 8.7 defines it: four dense blocks of four conv
//! blocks (growth rate 32), transition blocks halving the channels between
//! them.

use crate::nn::{
    transition_block, BatchNorm, Conv2d, DenseBlock, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
    ReLU, Sequential,
};

pub fn densenet() -> Sequential {
    let b1 = Sequential::new()
        .append(Conv2d::new(64, 7).stride(2).padding(3))
        .append(BatchNorm::new_2d())
        .append(ReLU)
        .append(MaxPool2d::new(3, 2).padding(1));
    let (growth_rate, convs_in_dense_blocks) = (32, [4, 4, 4, 4]);
    let mut channels = 64;
    let mut net = Sequential::new().append(b1);
    for (i, &num_convs) in convs_in_dense_blocks.iter().enumerate() {
        net = net.append(DenseBlock::new(num_convs, growth_rate));
        channels += num_convs * growth_rate;
        if i != convs_in_dense_blocks.len() - 1 {
            channels /= 2;
            net = net.append(transition_block(channels));
        }
    }
    net.append(BatchNorm::new_2d())
        .append(ReLU)
        .append(GlobalAvgPool2d)
        .append(Flatten)
        .append(Linear::new(10))
}
