//! Compute pipelines, created once per (shader, entry point, constants) and
//! shared by every plan that needs them.

use std::collections::HashMap;
use std::sync::Mutex;

/// Helpers every shader file can use (linear invocation index over a 2-D grid).
const PRELUDE: &str = include_str!("../../shaders/prelude.wgsl");

/// The WGSL files in `shaders/`, one per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    BatchNorm,
    Conv2d,
    Data,
    Eltwise,
    Gemm,
    GemmBlocked,
    /// `GemmBlocked` with A's loads shared across subgroups.
    GemmBlockedSubgroup,
    Optim,
    Pool,
    Reduce,
    SoftmaxXent,
}

impl Shader {
    pub const ALL: [Shader; 11] = [
        Shader::BatchNorm,
        Shader::Conv2d,
        Shader::Data,
        Shader::Eltwise,
        Shader::Gemm,
        Shader::GemmBlocked,
        Shader::GemmBlockedSubgroup,
        Shader::Optim,
        Shader::Pool,
        Shader::Reduce,
        Shader::SoftmaxXent,
    ];

    /// The file with its entry points.
    pub fn file_name(self) -> &'static str {
        match self {
            Shader::BatchNorm => "batchnorm.wgsl",
            Shader::Conv2d => "conv2d.wgsl",
            Shader::Data => "data.wgsl",
            Shader::Eltwise => "eltwise.wgsl",
            Shader::Gemm => "gemm.wgsl",
            Shader::GemmBlocked | Shader::GemmBlockedSubgroup => "gemm_blocked.wgsl",
            Shader::Optim => "optim.wgsl",
            Shader::Pool => "pool.wgsl",
            Shader::Reduce => "reduce.wgsl",
            Shader::SoftmaxXent => "softmax_xent.wgsl",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Shader::BatchNorm => include_str!("../../shaders/batchnorm.wgsl"),
            Shader::Conv2d => include_str!("../../shaders/conv2d.wgsl"),
            Shader::Data => include_str!("../../shaders/data.wgsl"),
            Shader::Eltwise => include_str!("../../shaders/eltwise.wgsl"),
            Shader::Gemm => include_str!("../../shaders/gemm.wgsl"),
            Shader::GemmBlocked | Shader::GemmBlockedSubgroup => {
                include_str!("../../shaders/gemm_blocked.wgsl")
            }
            Shader::Optim => include_str!("../../shaders/optim.wgsl"),
            Shader::Pool => include_str!("../../shaders/pool.wgsl"),
            Shader::Reduce => include_str!("../../shaders/reduce.wgsl"),
            Shader::SoftmaxXent => include_str!("../../shaders/softmax_xent.wgsl"),
        }
    }

    /// The file (name, text) the entry points' file needs besides the
    /// prelude: the blocked kernels' way of loading A.
    pub fn part(self) -> Option<(&'static str, &'static str)> {
        match self {
            Shader::GemmBlocked => Some((
                "gemm_blocked_a.wgsl",
                include_str!("../../shaders/gemm_blocked_a.wgsl"),
            )),
            Shader::GemmBlockedSubgroup => Some((
                "gemm_blocked_a_subgroup.wgsl",
                include_str!("../../shaders/gemm_blocked_a_subgroup.wgsl"),
            )),
            _ => None,
        }
    }

    /// Whether the shader uses subgroup operations (`Features::SUBGROUP`).
    pub fn needs_subgroups(self) -> bool {
        self == Shader::GemmBlockedSubgroup
    }

    /// The full WGSL source: the shared prelude, the parts, the file.
    pub fn source(self) -> String {
        let part = self.part().map_or("", |(_, text)| text);
        format!("{PRELUDE}\n{part}\n{}", self.body())
    }
}

/// Values for a shader's `override` constants (workgroup and tile sizes).
pub type Constants = Vec<(&'static str, u32)>;

#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(Shader, &'static str, Constants), wgpu::ComputePipeline>>,
}

impl PipelineCache {
    /// Pipelines created so far.
    pub fn created(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// The pipeline for `entry` in `shader` with the given override constants.
    pub fn get(
        &self,
        device: &wgpu::Device,
        shader: Shader,
        entry: &'static str,
        constants: &[(&'static str, u32)],
    ) -> wgpu::ComputePipeline {
        let key = (shader, entry, constants.to_vec());
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = self
            .modules
            .lock()
            .unwrap()
            .entry(shader)
            .or_insert_with(|| {
                let source = wgpu::ShaderModuleDescriptor {
                    label: Some(shader.file_name()),
                    source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                };
                // wgpu's default guard against infinite loops adds a 64-bit
                // counter to every loop, which keeps the driver's compiler
                // from unrolling loops whose trip count is a constant (a
                // pooling window's taps: 1.6x slower on lavapipe). Every
                // loop in these shaders is counted, so none can hang.
                let checks = wgpu::ShaderRuntimeChecks {
                    force_loop_bounding: false,
                    ..wgpu::ShaderRuntimeChecks::checked()
                };
                // SAFETY: the shaders are this crate's own and have no
                // infinite loops (see above); every other check stays on.
                unsafe { device.create_shader_module_trusted(source, checks) }
            })
            .clone();
        let values: Vec<(&str, f64)> = constants.iter().map(|&(k, v)| (k, f64::from(v))).collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &values,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        pipeline
    }
}
