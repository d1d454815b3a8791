//! The d2l architectures and the training defaults d2l uses for each.

mod alexnet;
mod densenet;
mod googlenet;
mod lenet;
mod lenet_bn;
mod nin;
mod resnet;
mod vgg;

pub use alexnet::alexnet;
pub use densenet::densenet;
pub use googlenet::googlenet;
pub use lenet::lenet;
pub use lenet_bn::lenet_bn;
pub use nin::nin;
pub use resnet::resnet18;
pub use vgg::vgg11_small;

use crate::graph::{DType, Graph, Shape};
use crate::nn::Sequential;
use anyhow::{bail, Context, Result};

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
    ModelSpec {
        name: "alexnet",
        build: alexnet,
        resize: 224,
        batch_size: 128,
        lr: 0.01,
        epochs: 10,
    },
    ModelSpec {
        name: "vgg",
        build: vgg11_small,
        resize: 224,
        batch_size: 128,
        lr: 0.05,
        epochs: 10,
    },
    ModelSpec {
        name: "nin",
        build: nin,
        resize: 224,
        batch_size: 128,
        lr: 0.1,
        epochs: 10,
    },
    ModelSpec {
        name: "googlenet",
        build: googlenet,
        resize: 96,
        batch_size: 128,
        lr: 0.1,
        epochs: 10,
    },
    ModelSpec {
        name: "resnet",
        build: resnet18,
        resize: 96,
        batch_size: 256,
        lr: 0.05,
        epochs: 10,
    },
    ModelSpec {
        name: "densenet",
        build: densenet,
        resize: 96,
        batch_size: 256,
        lr: 0.1,
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

/// What d2l's `layer_summary` shows: each top-level layer's class and
/// output shape for one image, and the parameter count.
pub struct Summary {
    pub layers: Vec<(&'static str, Shape)>,
    pub params: usize,
}

impl Summary {
    /// One line per layer, formatted as d2l prints them.
    pub fn lines(&self) -> Vec<String> {
        let dims = |s: &Shape| {
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.layers
            .iter()
            .enumerate()
            .map(|(i, (class, shape))| {
                format!("{i:>3} {class:<20} output shape:\t({})", dims(shape))
            })
            .collect()
    }
}

/// Runs the shape rules of `spec`'s model on one `resize` x `resize` image.
pub fn summary(spec: &ModelSpec, resize: usize) -> Result<Summary> {
    let model = (spec.build)();
    let mut g = Graph::new(false);
    let mut x = g.input(vec![1, 1, resize, resize], DType::F32);
    let mut layers = Vec::new();
    for (i, layer) in model.layers().iter().enumerate() {
        x = layer
            .forward(&mut g, x, &format!("{i}."))
            .with_context(|| {
                format!(
                    "{} at --resize {resize}: layer {i} ({})",
                    spec.name,
                    layer.class_name()
                )
            })?;
        layers.push((layer.class_name(), g.shape(x).to_vec()));
    }
    let params = g
        .params
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    Ok(Summary { layers, params })
}

/// Fails unless `spec`'s model takes `resize` x `resize` images, naming the
/// smallest size it takes (found with the shape rules alone, no GPU).
pub fn check_resize(spec: &ModelSpec, resize: usize) -> Result<()> {
    const LARGEST: usize = 1024;
    if resize > LARGEST {
        bail!("--resize {resize} is larger than the {LARGEST} this program accepts");
    }
    match summary(spec, resize) {
        Ok(_) => Ok(()),
        Err(e) => match (1..=LARGEST).find(|&r| summary(spec, r).is_ok()) {
            Some(smallest) => Err(e.context(format!(
                "--resize {resize} is too small for {}: it takes sizes from {smallest} (d2l uses {})",
                spec.name, spec.resize
            ))),
            None => Err(e),
        },
    }
}
