//! d2l-wgpu: the classic CNNs of *Dive into Deep Learning*, trained on
//! Fashion-MNIST with every op written as a WGSL compute shader.
//!
//! Data flows one way: `data` -> GPU input pipeline (`ops::GatherResize`) ->
//! `graph` (forward, loss, backward, optimizer, built from `nn` layers into
//! `models`) -> metrics, driven by `train`.

pub mod data;
pub mod gpu;
pub mod graph;
pub mod models;
pub mod nn;
pub mod ops;
pub mod train;
