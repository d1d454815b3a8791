//! Compute pipelines, created once per (shader, entry point, constants) and
//! shared by every plan that needs them.

use std::collections::HashMap;
use std::sync::Mutex;

/// Helpers every shader file can use (linear invocation index over a 2-D grid).
const PRELUDE: &str = include_str!("../../shaders/prelude.wgsl");

/// The WGSL files in `shaders/`, one per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Conv2d,
    Data,
    Eltwise,
    Gemm,
    Optim,
    Pool,
    Reduce,
    SoftmaxXent,
}

impl Shader {
    pub const ALL: [Shader; 8] = [
        Shader::Conv2d,
        Shader::Data,
        Shader::Eltwise,
        Shader::Gemm,
        Shader::Optim,
        Shader::Pool,
        Shader::Reduce,
        Shader::SoftmaxXent,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Shader::Conv2d => "conv2d.wgsl",
            Shader::Data => "data.wgsl",
            Shader::Eltwise => "eltwise.wgsl",
            Shader::Gemm => "gemm.wgsl",
            Shader::Optim => "optim.wgsl",
            Shader::Pool => "pool.wgsl",
            Shader::Reduce => "reduce.wgsl",
            Shader::SoftmaxXent => "softmax_xent.wgsl",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Shader::Conv2d => include_str!("../../shaders/conv2d.wgsl"),
            Shader::Data => include_str!("../../shaders/data.wgsl"),
            Shader::Eltwise => include_str!("../../shaders/eltwise.wgsl"),
            Shader::Gemm => include_str!("../../shaders/gemm.wgsl"),
            Shader::Optim => include_str!("../../shaders/optim.wgsl"),
            Shader::Pool => include_str!("../../shaders/pool.wgsl"),
            Shader::Reduce => include_str!("../../shaders/reduce.wgsl"),
            Shader::SoftmaxXent => include_str!("../../shaders/softmax_xent.wgsl"),
        }
    }

    /// The full WGSL source: the shared prelude followed by the file.
    pub fn source(self) -> String {
        format!("{PRELUDE}\n{}", self.body())
    }
}

#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(Shader, &'static str, u32), wgpu::ComputePipeline>>,
}

impl PipelineCache {
    /// The pipeline for `entry` in `shader` with workgroup size `workgroup`.
    pub fn get(
        &self,
        device: &wgpu::Device,
        shader: Shader,
        entry: &'static str,
        workgroup: u32,
    ) -> wgpu::ComputePipeline {
        let key = (shader, entry, workgroup);
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = self
            .modules
            .lock()
            .unwrap()
            .entry(shader)
            .or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(shader.file_name()),
                    source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                })
            })
            .clone();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[("WG", workgroup as f64)],
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        pipeline
    }
}
