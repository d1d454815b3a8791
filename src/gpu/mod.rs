//! The wgpu runtime: adapter choice, a device with the adapter's own limits,
//! buffer helpers, readback and the compute-pipeline cache.

mod pipelines;

pub use pipelines::{PipelineCache, Shader};

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Which wgpu backend to use; `Auto` lets wgpu (and `WGPU_BACKEND`) decide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }
}

/// How the user asked for an adapter: `--backend` and `--adapter`, with
/// wgpu's `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` as fallbacks.
#[derive(Clone, Debug, Default)]
pub struct AdapterRequest {
    pub backend: BackendChoice,
    pub name_contains: Option<String>,
}

/// One adapter as `d2l-wgpu devices` lists it.
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

/// The device everything runs on, plus what we learnt about its adapter.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub pipelines: PipelineCache,
    pub tuning: Tuning,
    errors: Arc<Mutex<Vec<String>>>,
    /// Buffers and bind groups created so far (pipelines are counted by the cache).
    created: AtomicUsize,
}

/// Kernel shape parameters chosen per adapter.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Invocations per workgroup (the `WG` override constant).
    pub workgroup: u32,
    /// Binds at most this many bytes at once even where the adapter allows
    /// more (tests use it to exercise batch chunking on small tensors).
    pub binding_limit: u64,
    /// Which kernel family serves Linear layers and convolutions.
    pub gemm: GemmKernel,
}

/// The two families of matrix-product kernels (Linear, and convolutions as
/// implicit GEMMs), each fastest on its kind of adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `shaders/gemm.wgsl` and `shaders/conv2d.wgsl`: a 4x4 tile per
    /// invocation read through strides, workgroups of `Tuning::workgroup`:
    /// what GPUs with many registers per thread and wide workgroups want.
    Strided,
    /// `shaders/gemm_blocked.wgsl`: a 32x16 tile per invocation on packed
    /// operands, workgroups of `workgroup` (the SIMD width): what CPU
    /// adapters want (lavapipe: 19-33 GFLOP/s at 1024^3 where `Strided`
    /// gives 4). With `subgroups` the lanes of a subgroup share their loads
    /// of A (`shaders/gemm_blocked_a_subgroup.wgsl`; needs
    /// `Features::SUBGROUP` and subgroups of at least 8 lanes). Where A
    /// takes at most `rows_first_bytes`, the grid walks the row tiles
    /// first (`ROWS_FIRST`).
    Blocked {
        workgroup: u32,
        subgroups: bool,
        rows_first_bytes: u64,
    },
}

/// CPU adapters run workgroups in grid order. Where A fits a core's cache,
/// the blocked kernels run the row tiles over the same columns back to
/// back, so that they read B while it is cached too. Measured on lavapipe
/// (1 MiB of L2 per core): ResNet's first 1x1 stride-2 shortcut, which
/// gathers a quarter of a 38 MB x, 33.0 -> 26.3 ms; convolutions that read
/// all of x within a few percent either way; with 4 MiB of A (`bench
/// --gemm` at 1024^3) 13% slower, with 9.4 MB (ResNet's last 3x3 layers)
/// 5%.
const ROWS_FIRST_BYTES: u64 = 1 << 20;

impl Tuning {
    /// The defaults, with the matrix-product kernel for this kind of
    /// adapter and the features its device was opened with.
    pub fn for_adapter(info: &wgpu::AdapterInfo, features: wgpu::Features) -> Tuning {
        let gemm = if info.device_type == wgpu::DeviceType::Cpu {
            GemmKernel::Blocked {
                workgroup: 8,
                subgroups: features.contains(wgpu::Features::SUBGROUP)
                    && info.subgroup_min_size >= 8,
                rows_first_bytes: ROWS_FIRST_BYTES,
            }
        } else {
            GemmKernel::Strided
        };
        Tuning {
            gemm,
            ..Tuning::default()
        }
    }
}

impl Default for Tuning {
    /// One value serves every adapter measured so far: on lavapipe (8-wide
    /// SIMD per workgroup) 64 beats 8 for elementwise kernels, where
    /// per-workgroup overhead dominates, and ties for convolutions; GPUs
    /// want 64-256. Kernels with few invocations choose their own (conv
    /// filter gradients).
    fn default() -> Tuning {
        Tuning {
            workgroup: 64,
            binding_limit: u64::MAX,
            gemm: GemmKernel::Strided,
        }
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    })
}

/// Every adapter of every native backend, for `d2l-wgpu devices`.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let adapters = pollster::block_on(
        instance(wgpu::Backends::all()).enumerate_adapters(wgpu::Backends::all()),
    );
    adapters
        .into_iter()
        .map(|a| AdapterSummary {
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
        })
        .collect()
}

fn no_adapter_error(backends: wgpu::Backends, name: Option<&str>) -> anyhow::Error {
    let wanted = match name {
        Some(n) => format!(" whose name contains {n:?}"),
        None => String::new(),
    };
    anyhow::anyhow!(
        "no GPU adapter{wanted} found (backends tried: {backends:?}).\n\
         `d2l-wgpu devices` lists the adapters wgpu can see. On a Linux machine without a GPU, \
         install a software Vulkan driver: `apt-get install mesa-vulkan-drivers` (lavapipe)."
    )
}

impl Gpu {
    pub fn new(request: &AdapterRequest) -> Result<Gpu> {
        let backends = request.backend.backends();
        let instance = instance(backends);
        let name = request
            .name_contains
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok());
        let adapter = match &name {
            Some(name) => {
                let needle = name.to_lowercase();
                pollster::block_on(instance.enumerate_adapters(backends))
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                    .ok_or_else(|| no_adapter_error(backends, Some(name)))?
            }
            None => pollster::block_on(
                instance.request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    ..Default::default()
                }),
            )
            .map_err(|_| no_adapter_error(backends, None))?,
        };
        let info = adapter.get_info();
        // The adapter's own limits, not wgpu's conservative defaults: lavapipe
        // allows 128 MiB per storage binding where the default is 128 MiB too,
        // but real GPUs allow far more, and buffers may be up to 2 GiB.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("d2l-wgpu"),
            // Timestamps serve `bench --profile`, subgroups the blocked
            // kernels where the adapter has them; everything else is
            // baseline WebGPU.
            required_features: adapter.features()
                & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("could not open a device on adapter {:?}", info.name))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            sink.lock()
                .unwrap()
                .push(format!("the GPU device was lost ({reason:?}): {message}"));
        });
        log::info!(
            "adapter {:?} ({:?}, {:?}), max storage binding {} B, max buffer {} B",
            info.name,
            info.backend,
            info.device_type,
            limits.max_storage_buffer_binding_size,
            limits.max_buffer_size
        );
        let tuning = Tuning::for_adapter(&info, device.features());
        Ok(Gpu {
            device,
            queue,
            tuning,
            info,
            limits,
            pipelines: PipelineCache::default(),
            errors,
            created: AtomicUsize::new(0),
        })
    }

    /// Fails with the first GPU error wgpu reported since the last check.
    pub fn check_errors(&self) -> Result<()> {
        let mut errors = self.errors.lock().unwrap();
        if errors.is_empty() {
            return Ok(());
        }
        let first = errors.remove(0);
        errors.clear();
        bail!("GPU error: {first}")
    }

    /// Runs `f` inside wgpu error scopes: an out-of-memory or validation
    /// error it causes comes back as an error saying what was being done.
    pub fn scoped<T>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> Result<T> {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let value = f();
        let out_of_memory = pollster::block_on(memory.pop());
        let invalid = pollster::block_on(validation.pop());
        match (out_of_memory, invalid) {
            (Some(e), _) => bail!(
                "{}: the GPU is out of memory ({e}); try a smaller --batch-size or --resize",
                what()
            ),
            (None, Some(e)) => bail!("{}: GPU validation error: {e}", what()),
            (None, None) => Ok(value),
        }
    }

    /// The largest storage binding this project uses: one 256-byte unit below
    /// the adapter's limit, because lavapipe (Mesa 22.3) reads zeros from
    /// parts of a binding exactly `maxStorageBufferRange` long (found by
    /// tests/ops.rs at 128 MiB); a binding one unit shorter reads correctly.
    pub fn max_binding(&self) -> u64 {
        ((self.limits.max_storage_buffer_binding_size - 1) & !255).min(self.tuning.binding_limit)
    }

    /// How many buffers, bind groups and pipelines this device has had
    /// created through `Gpu`: tests check a training step adds none.
    pub fn resources_created(&self) -> usize {
        self.created.load(Ordering::Relaxed) + self.pipelines.created()
    }

    /// Bytes of GPU memory held by live buffers now, as the backend's
    /// allocator counts them (buffers are freed once the GPU is done with
    /// them, so wait first for a stable figure).
    pub fn live_buffer_bytes(&self) -> u64 {
        let counters = self.device.get_internal_counters();
        counters.hal.buffer_memory.read().max(0) as u64
    }

    pub fn buffer(&self, desc: &wgpu::BufferDescriptor<'_>) -> wgpu::Buffer {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(desc)
    }

    pub fn bind_group(&self, desc: &wgpu::BindGroupDescriptor<'_>) -> wgpu::BindGroup {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_bind_group(desc)
    }

    pub fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        if bytes > self.limits.max_buffer_size {
            bail!(
                "buffer {label:?} needs {bytes} bytes but the adapter allows at most {} per buffer; \
                 try a smaller --batch-size or --resize",
                self.limits.max_buffer_size
            );
        }
        let size = bytes.max(4).next_multiple_of(4);
        self.scoped(
            || format!("allocating buffer {label:?} of {size} bytes"),
            || {
                self.buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            },
        )
    }

    pub fn uniform_buffer(&self, label: &str, contents: &[u8]) -> wgpu::Buffer {
        let buffer = self.buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (contents.len() as u64).next_multiple_of(16),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, contents);
        buffer
    }

    /// Copies `size` bytes at `offset` of `buffer` back to the CPU, waiting for
    /// all submitted work.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let padded = size.next_multiple_of(4);
        let staging = self.buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .context("waiting for the GPU")?;
        rx.recv()
            .context("readback callback never ran")?
            .context("mapping a readback buffer")?;
        self.check_errors()?;
        let bytes = staging
            .get_mapped_range(..)
            .context("reading a mapped buffer")?
            .to_vec();
        Ok(bytes[..size as usize].to_vec())
    }

    pub fn read_f32(&self, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, offset, 4 * len as u64)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Waits until the GPU has finished everything submitted so far.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .context("waiting for the GPU")?;
        self.check_errors()
    }
}

/// The most workgroups a dispatch may have along one dimension.
pub const MAX_GROUPS: u32 = 65_535;

/// Splits `workgroups` into a grid no dimension of which exceeds the
/// 65,535 limit; shaders rebuild the linear index with `linear_index()`.
pub fn grid(workgroups: u32) -> [u32; 3] {
    if workgroups <= MAX_GROUPS {
        [workgroups.max(1), 1, 1]
    } else {
        [MAX_GROUPS, workgroups.div_ceil(MAX_GROUPS), 1]
    }
}

/// A grid of `blocks` rows (workgroup_id.y, the same for a whole workgroup)
/// of `lane_groups` workgroups each, folded into x and z past the 65,535
/// limit; shaders rebuild the group with `lane_group()`.
pub fn tiled_grid(lane_groups: u32, blocks: u32) -> [u32; 3] {
    let x = lane_groups.clamp(1, MAX_GROUPS);
    [x, blocks.max(1), lane_groups.div_ceil(x).max(1)]
}
