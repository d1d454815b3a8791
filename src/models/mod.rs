//! The d2l architectures and the training defaults d2l uses for each.

mod lenet;
mod lenet_bn;

pub use lenet::lenet;
pub use lenet_bn::lenet_bn;

use crate::nn::Sequential;
use anyhow::{bail, Result};

/// A model and d2l's defaults for training it on Fashion-MNIST.
pub struct ModelSpec {
    pub name: &'static str,
    pub build: fn() -> Sequential,
    pub resize: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub epochs: usize,
}

pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "lenet",
        build: lenet,
        resize: 28,
        batch_size: 256,
        lr: 0.9,
        epochs: 10,
    },
    ModelSpec {
        name: "lenet-bn",
        build: lenet_bn,
        resize: 28,
        batch_size: 256,
        lr: 1.0,
        epochs: 10,
    },
];

pub fn find(name: &str) -> Result<&'static ModelSpec> {
    match MODELS.iter().find(|m| m.name == name) {
        Some(m) => Ok(m),
        None => {
            let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
            bail!(
                "unknown model {name:?}; expected one of: {}",
                known.join(", ")
            )
        }
    }
}
