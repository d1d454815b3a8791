//! One file per op: shape rule, GPU dispatch, backward rule and CPU
//! reference, read side by side. Each pairs with a file in `shaders/`.

mod batchnorm;
mod blocked;
mod concat;
mod conv2d;
mod eltwise;
mod fused;
mod input;
mod linear;
mod optim;
mod parallel_conv2d;
mod pool;
mod reduce;
mod reshape;
mod softmax_xent;

pub use batchnorm::{BatchNorm, BatchNormBackwardData, BatchNormBackwardParams, BatchNormCpu};
pub use concat::{Concat, ConcatRows};
pub use conv2d::{Conv2d, Conv2dBackwardData, Conv2dBackwardFilter};
pub use eltwise::{
    dropout_keeps, Activation, ActivationBackward, Add, AdvanceRng, Dropout, DropoutBackward,
};
pub use input::GatherResize;
pub use linear::{Linear, MatMul};
pub use optim::{Optimizer, OptimizerStep, ADAM_STEP_BYTES};
pub use parallel_conv2d::ParallelConv2d;
pub use pool::{AvgPool2d, AvgPool2dBackward, MaxPool2d, MaxPool2dBackward, PoolWindow};
pub use reduce::ChannelSum;
pub use reshape::Reshape;
pub use softmax_xent::{AccumulateConfusion, AccumulateMetrics, SoftmaxCrossEntropy};

use crate::graph::{DType, Shape, Tensor};
use anyhow::{bail, Result};

/// A dense row-major f32 tensor on the CPU: what the CPU references take and
/// return.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub shape: Shape,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(shape: &[usize], data: Vec<f32>) -> CpuTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?}"
        );
        CpuTensor {
            shape: shape.to_vec(),
            data,
        }
    }

    pub fn zeros(shape: &[usize]) -> CpuTensor {
        CpuTensor::new(shape, vec![0.0; shape.iter().product()])
    }
}

/// Checks that `t` is f32 with `rank` dimensions; `what` names it in the error.
fn expect_rank(t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.shape.len() != rank || t.dtype != DType::F32 {
        bail!(
            "{what} must be an f32 tensor of rank {rank}, got {:?} {:?}",
            t.dtype,
            t.shape
        );
    }
    Ok(())
}
