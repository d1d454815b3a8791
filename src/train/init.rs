//! Initial parameter values: d2l's `init_cnn` (Xavier-uniform weights, zero
//! biases).

use super::rng::Rng;
use crate::graph::{Init, ParamSpec};

/// `nn.init.xavier_uniform_`: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)),
/// where fans count the receptive field of conv kernels.
pub fn initial_values(spec: &ParamSpec, rng: &mut Rng) -> Vec<f32> {
    let len: usize = spec.shape.iter().product();
    match spec.init {
        Init::Zeros => vec![0.0; len],
        Init::Ones => vec![1.0; len],
        Init::XavierUniform => {
            let receptive: usize = spec.shape[2..].iter().product();
            let fan_in = spec.shape[1] * receptive;
            let fan_out = spec.shape[0] * receptive;
            let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
            (0..len)
                .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                .collect()
        }
    }
}
