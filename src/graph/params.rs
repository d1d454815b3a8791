//! Parameters and their gradients, each packed into one flat GPU buffer with
//! the same layout, so the optimizer updates everything in a few dispatches
//! and every plan built for the model shares the same weights.

use super::{Binding, ParamSpec};
use crate::gpu::Gpu;
use anyhow::{bail, Result};

pub struct ParamStore {
    pub specs: Vec<ParamSpec>,
    /// Byte offset of each parameter in both flat buffers.
    offsets: Vec<u64>,
    pub values: wgpu::Buffer,
    pub grads: wgpu::Buffer,
    /// Bytes of either buffer (a multiple of 16: the optimizer works in vec4s).
    pub bytes: u64,
}

impl ParamStore {
    pub fn new(gpu: &Gpu, specs: &[ParamSpec]) -> Result<ParamStore> {
        let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment).max(16);
        let mut offsets = Vec::with_capacity(specs.len());
        let mut bytes = 0u64;
        for spec in specs {
            let size = 4 * spec.shape.iter().product::<usize>() as u64;
            if size > gpu.max_binding() {
                bail!(
                    "parameter {} ({:?}) takes {size} bytes, more than the adapter's largest storage binding ({} bytes)",
                    spec.name,
                    spec.shape,
                    gpu.max_binding()
                );
            }
            offsets.push(bytes);
            bytes = (bytes + size).next_multiple_of(align);
        }
        let bytes = bytes.max(16);
        Ok(ParamStore {
            specs: specs.to_vec(),
            offsets,
            values: gpu.storage_buffer("parameters", bytes)?,
            grads: gpu.storage_buffer("gradients", bytes)?,
            bytes,
        })
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    fn len(&self, index: usize) -> usize {
        self.specs[index].shape.iter().product()
    }

    pub fn value_binding(&self, index: usize) -> Binding {
        Binding {
            buffer: self.values.clone(),
            offset: self.offsets[index],
            size: 4 * self.len(index) as u64,
        }
    }

    pub fn grad_binding(&self, index: usize) -> Binding {
        Binding {
            buffer: self.grads.clone(),
            offset: self.offsets[index],
            size: 4 * self.len(index) as u64,
        }
    }

    pub fn write(&self, gpu: &Gpu, index: usize, values: &[f32]) -> Result<()> {
        if values.len() != self.len(index) {
            bail!(
                "parameter {} has {} elements, got {}",
                self.specs[index].name,
                self.len(index),
                values.len()
            );
        }
        gpu.queue.write_buffer(
            &self.values,
            self.offsets[index],
            bytemuck::cast_slice(values),
        );
        Ok(())
    }

    pub fn read(&self, gpu: &Gpu, index: usize) -> Result<Vec<f32>> {
        gpu.read_f32(&self.values, self.offsets[index], self.len(index))
    }

    pub fn read_grad(&self, gpu: &Gpu, index: usize) -> Result<Vec<f32>> {
        gpu.read_f32(&self.grads, self.offsets[index], self.len(index))
    }
}
