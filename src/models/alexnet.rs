//! AlexNet as d2l's section 8.1 defines it for Fashion-MNIST (one input
//! channel, ten classes, 224x224 images).

use crate::nn::{dropout_classifier, Conv2d, MaxPool2d, ReLU, Sequential};

pub fn alexnet() -> Sequential {
    let features = Sequential::new()
        .append(Conv2d::new(96, 11).stride(4).padding(1))
        .append(ReLU)
        .append(MaxPool2d::new(3, 2))
        .append(Conv2d::new(256, 5).padding(2))
        .append(ReLU)
        .append(MaxPool2d::new(3, 2))
        .append(Conv2d::new(384, 3).padding(1))
        .append(ReLU)
        .append(Conv2d::new(384, 3).padding(1))
        .append(ReLU)
        .append(Conv2d::new(256, 3).padding(1))
        .append(ReLU)
        .append(MaxPool2d::new(3, 2));
    dropout_classifier(features)
}
