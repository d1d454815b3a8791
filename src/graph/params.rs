//! Parameters, their gradients and the non-trainable state (BatchNorm
//! running statistics), each packed into one flat GPU buffer. Parameters and
//! gradients share a layout, so the optimizer updates everything in a few
//! dispatches, and every plan built for a model shares the same weights.

use super::{Binding, Graph, ParamSpec};
use crate::gpu::Gpu;
use anyhow::{bail, Result};

/// Where each tensor of a list lives in a flat buffer.
struct FlatLayout {
    specs: Vec<ParamSpec>,
    offsets: Vec<u64>,
    /// A multiple of 16 (the optimizer works in vec4s), at least 16.
    bytes: u64,
}

impl FlatLayout {
    fn new(gpu: &Gpu, specs: &[ParamSpec]) -> Result<FlatLayout> {
        let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment).max(16);
        let mut offsets = Vec::with_capacity(specs.len());
        let mut bytes = 0u64;
        for spec in specs {
            let size = 4 * spec.shape.iter().product::<usize>() as u64;
            if size > gpu.max_binding() {
                bail!(
                    "{} ({:?}) takes {size} bytes, more than the adapter's largest storage binding ({} bytes)",
                    spec.name,
                    spec.shape,
                    gpu.max_binding()
                );
            }
            offsets.push(bytes);
            bytes = (bytes + size).next_multiple_of(align);
        }
        Ok(FlatLayout {
            specs: specs.to_vec(),
            offsets,
            bytes: bytes.max(16),
        })
    }

    fn len(&self, index: usize) -> usize {
        self.specs[index].shape.iter().product()
    }

    fn binding(&self, buffer: &wgpu::Buffer, index: usize) -> Binding {
        Binding {
            buffer: buffer.clone(),
            offset: self.offsets[index],
            size: 4 * self.len(index) as u64,
        }
    }

    fn write(&self, gpu: &Gpu, buffer: &wgpu::Buffer, index: usize, values: &[f32]) -> Result<()> {
        if values.len() != self.len(index) {
            bail!(
                "{} has {} elements, got {}",
                self.specs[index].name,
                self.len(index),
                values.len()
            );
        }
        gpu.queue
            .write_buffer(buffer, self.offsets[index], bytemuck::cast_slice(values));
        Ok(())
    }

    fn read(&self, gpu: &Gpu, buffer: &wgpu::Buffer, index: usize) -> Result<Vec<f32>> {
        gpu.read_f32(buffer, self.offsets[index], self.len(index))
    }

    /// Fails unless `specs` are these tensors, in this order.
    fn check(&self, specs: &[ParamSpec], what: &str) -> Result<()> {
        let same = specs.len() == self.specs.len()
            && specs
                .iter()
                .zip(&self.specs)
                .all(|(a, b)| a.name == b.name && a.shape == b.shape);
        if !same {
            let names = |s: &[ParamSpec]| {
                s.iter()
                    .map(|p| format!("{} {:?}", p.name, p.shape))
                    .collect::<Vec<_>>()
            };
            bail!(
                "the graph's {what} {:?} differ from the store's {:?}",
                names(specs),
                names(&self.specs)
            );
        }
        Ok(())
    }
}

pub struct ParamStore {
    params: FlatLayout,
    state: FlatLayout,
    pub values: wgpu::Buffer,
    pub grads: wgpu::Buffer,
    pub state_values: wgpu::Buffer,
    /// Bytes of the parameter (and gradient) buffer.
    pub bytes: u64,
}

impl ParamStore {
    /// Buffers for the parameters and state `graph` declares.
    pub fn new(gpu: &Gpu, graph: &Graph) -> Result<ParamStore> {
        let params = FlatLayout::new(gpu, &graph.params)?;
        let state = FlatLayout::new(gpu, &graph.state)?;
        Ok(ParamStore {
            values: gpu.storage_buffer("parameters", params.bytes)?,
            grads: gpu.storage_buffer("gradients", params.bytes)?,
            state_values: gpu.storage_buffer("state", state.bytes)?,
            bytes: params.bytes,
            params,
            state,
        })
    }

    /// Fails unless `graph` declares exactly the parameters and state stored here.
    pub fn check(&self, graph: &Graph) -> Result<()> {
        self.params.check(&graph.params, "parameters")?;
        self.state.check(&graph.state, "state tensors")
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.params.specs
    }

    pub fn state_specs(&self) -> &[ParamSpec] {
        &self.state.specs
    }

    pub fn value_binding(&self, index: usize) -> Binding {
        self.params.binding(&self.values, index)
    }

    pub fn grad_binding(&self, index: usize) -> Binding {
        self.params.binding(&self.grads, index)
    }

    pub fn state_binding(&self, index: usize) -> Binding {
        self.state.binding(&self.state_values, index)
    }

    pub fn write(&self, gpu: &Gpu, index: usize, values: &[f32]) -> Result<()> {
        self.params.write(gpu, &self.values, index, values)
    }

    pub fn read(&self, gpu: &Gpu, index: usize) -> Result<Vec<f32>> {
        self.params.read(gpu, &self.values, index)
    }

    pub fn read_grad(&self, gpu: &Gpu, index: usize) -> Result<Vec<f32>> {
        self.params.read(gpu, &self.grads, index)
    }

    /// Tensor `index` of a buffer laid out like the parameters (the
    /// gradients, the optimizer's state).
    pub fn read_param_shaped(
        &self,
        gpu: &Gpu,
        buffer: &wgpu::Buffer,
        index: usize,
    ) -> Result<Vec<f32>> {
        self.params.read(gpu, buffer, index)
    }

    pub fn write_param_shaped(
        &self,
        gpu: &Gpu,
        buffer: &wgpu::Buffer,
        index: usize,
        values: &[f32],
    ) -> Result<()> {
        self.params.write(gpu, buffer, index, values)
    }

    pub fn write_state(&self, gpu: &Gpu, index: usize, values: &[f32]) -> Result<()> {
        self.state.write(gpu, &self.state_values, index, values)
    }

    pub fn read_state(&self, gpu: &Gpu, index: usize) -> Result<Vec<f32>> {
        self.state.read(gpu, &self.state_values, index)
    }
}
