//! VGG-11 as d2l's section 8.2 trains it: the channel counts of
//! `((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))` divided by 4.

use crate::nn::{dropout_classifier, vgg_block, Sequential};

pub fn vgg11_small() -> Sequential {
    let arch = [(1, 16), (1, 32), (2, 64), (2, 128), (2, 128)];
    let features = arch
        .into_iter()
        .fold(Sequential::new(), |net, (num_convs, channels)| {
            net.append(vgg_block(num_convs, channels))
        });
    dropout_classifier(features)
}
