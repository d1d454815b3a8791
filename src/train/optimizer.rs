//! The optimizer's state on the GPU: one flat buffer per state tensor
//! (momentum buffer, Adam's moments), laid out like the parameters, and
//! Adam's step record. It is read only for checkpoints.

use super::checkpoint::{StoredTensor, TensorFile};
use crate::gpu::Gpu;
use crate::graph::{Binding, DType, Externals, Graph, ParamStore, TensorId};
use crate::ops::{Optimizer, OptimizerStep, ADAM_STEP_BYTES};
use anyhow::{bail, Result};

const STATE_KEYS: [&str; 2] = ["optimizer state 0", "optimizer state 1"];
const STEP_KEY: &str = "optimizer step";

pub struct OptimizerState {
    pub optimizer: Optimizer,
    buffers: Vec<wgpu::Buffer>,
    step: Option<wgpu::Buffer>,
}

impl OptimizerState {
    /// Zeroed state, as torch creates it on the first step.
    pub fn new(gpu: &Gpu, optimizer: Optimizer, params: &ParamStore) -> Result<OptimizerState> {
        let buffers = optimizer
            .state_names()
            .iter()
            .map(|name| gpu.storage_buffer(name, params.bytes))
            .collect::<Result<_>>()?;
        let step = if optimizer.counts_steps() {
            Some(gpu.storage_buffer("adam step", ADAM_STEP_BYTES)?)
        } else {
            None
        };
        Ok(OptimizerState {
            optimizer,
            buffers,
            step,
        })
    }

    /// Adds the update of the flat `parameters` from the flat `gradients` to a step graph.
    pub fn add_step(
        optimizer: Optimizer,
        g: &mut Graph,
        gradients: TensorId,
        parameters: TensorId,
    ) {
        let floats = g.shape(parameters).to_vec();
        let mut outputs = vec![parameters];
        for key in &STATE_KEYS[..optimizer.state_names().len()] {
            outputs.push(g.external(key, floats.clone(), DType::F32));
        }
        if optimizer.counts_steps() {
            outputs.push(g.external(STEP_KEY, vec![4], DType::U32));
        }
        g.apply_into(OptimizerStep(optimizer), &[gradients], &outputs);
    }

    pub fn bind(&self, externals: &mut Externals) {
        for (key, buffer) in STATE_KEYS.iter().zip(&self.buffers) {
            externals.insert(key, Binding::whole(buffer));
        }
        if let Some(step) = &self.step {
            externals.insert(STEP_KEY, Binding::whole(step));
        }
    }

    /// Adds the state to a sidecar file: `<state>.<parameter>` tensors and
    /// Adam's `step`.
    pub fn save(&self, gpu: &Gpu, params: &ParamStore, file: &mut TensorFile) -> Result<()> {
        for (name, buffer) in self.optimizer.state_names().iter().zip(&self.buffers) {
            for (i, spec) in params.specs().iter().enumerate() {
                let values = params.read_param_shaped(gpu, buffer, i)?;
                file.tensors.insert(
                    format!("{name}.{}", spec.name),
                    StoredTensor::f32(&spec.shape, &values),
                );
            }
        }
        if let Some(step) = &self.step {
            let words = gpu.read_bytes(step, 0, 4)?;
            let count = u32::from_le_bytes(words[..4].try_into().expect("4 bytes"));
            file.tensors
                .insert("step".into(), StoredTensor::i64(&[], &[i64::from(count)]));
        }
        Ok(())
    }

    /// Restores what `save` wrote.
    pub fn load(
        &self,
        gpu: &Gpu,
        params: &ParamStore,
        file: &TensorFile,
        path: &str,
    ) -> Result<()> {
        for (name, buffer) in self.optimizer.state_names().iter().zip(&self.buffers) {
            for (i, spec) in params.specs().iter().enumerate() {
                let key = format!("{name}.{}", spec.name);
                let values = match file.tensors.get(&key) {
                    Some(t) if t.shape == spec.shape => t.to_f32(),
                    _ => None,
                };
                let Some(values) = values else {
                    bail!(
                        "{path}: no f32 tensor {key} of shape {:?} for {}",
                        spec.shape,
                        self.optimizer
                    )
                };
                params.write_param_shaped(gpu, buffer, i, &values)?;
            }
        }
        if let Some(step) = &self.step {
            let count = match file.tensors.get("step").and_then(StoredTensor::to_i64) {
                Some(count) if count.len() == 1 => count[0],
                _ => bail!("{path}: no int64 `step` for {}", self.optimizer),
            };
            let record = [count as u32, 0, 0, 0];
            gpu.queue
                .write_buffer(step, 0, bytemuck::cast_slice(&record));
        }
        Ok(())
    }
}
