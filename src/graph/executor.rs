//! Turns a graph into a `Plan`: every tensor gets its bytes, every node its
//! pipelines, uniforms and bind groups, all created once. Running a step
//! replays the recorded dispatches in one compute pass and one submit.

use super::{fusion, DType, Graph, Node, Shape, Storage, TensorId};
use crate::gpu::{grid, tiled_grid, Gpu, Shader, MAX_GROUPS};
use crate::graph::ParamStore;
use anyhow::{bail, Context, Result};
use std::borrow::Borrow;
use std::collections::HashMap;

/// A byte range of a buffer, bound as one shader storage array.
#[derive(Clone, Debug)]
pub struct Binding {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl Binding {
    pub fn whole(buffer: &wgpu::Buffer) -> Binding {
        Binding {
            buffer: buffer.clone(),
            offset: 0,
            size: buffer.size(),
        }
    }

    fn resource(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size.max(4).next_multiple_of(4)),
        })
    }
}

/// Buffers a graph's `External` tensors are bound to, by key.
pub type Externals = HashMap<&'static str, Binding>;

/// One recorded compute dispatch.
pub struct Dispatch {
    pub label: String,
    /// The shader entry point it runs.
    entry: &'static str,
    /// The graph node it belongs to.
    node: usize,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// A dispatch as an op records it: its bind group waits until the plan
/// knows how large each scratch buffer must be.
struct PendingDispatch {
    label: String,
    entry: &'static str,
    node: usize,
    pipeline: wgpu::ComputePipeline,
    uniform: wgpu::Buffer,
    storage: Vec<(u32, Binding)>,
    workgroups: [u32; 3],
}

/// Scratch memory shared by all ops of a plan. An op's scratch holds
/// intermediates it reads back within its own dispatches (packed matrices,
/// split-K partial sums), and dispatches run in order, so the k-th scratch
/// request of every op can use the same buffer: one per k, as large as the
/// largest request. While ops plan, that buffer does not exist yet; they
/// get a 4-byte stand-in that the bind groups later swap for it.
struct ScratchSlot {
    stand_in: wgpu::Buffer,
    bytes: u64,
}

impl Dispatch {
    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Samples `first..first + count` of the batch. While an op plans one
/// chunk, each of its `batched` tensors looks like a batch of `count`,
/// bound to just the byte range that holds those samples.
struct Chunk {
    first: usize,
    count: usize,
    batched: Vec<TensorId>,
}

/// What an op sees while it plans: tensor shapes and bindings, scratch
/// memory, and `dispatch` to record its kernels.
pub struct PlanContext<'a> {
    pub gpu: &'a Gpu,
    pub graph: &'a Graph,
    bindings: Vec<Option<Binding>>,
    dispatches: Vec<PendingDispatch>,
    scratch: Vec<ScratchSlot>,
    /// Scratch requests of the op being planned so far.
    scratch_requests: usize,
    label: String,
    node: usize,
    chunk: Option<Chunk>,
}

impl PlanContext<'_> {
    /// The chunk `t` is seen through, if it is one of the batched tensors.
    fn chunk_of(&self, t: TensorId) -> Option<&Chunk> {
        self.chunk.as_ref().filter(|c| c.batched.contains(&t))
    }

    pub fn shape(&self, t: TensorId) -> Shape {
        let mut shape = self.graph.shape(t).to_vec();
        if let Some(chunk) = self.chunk_of(t) {
            shape[0] = chunk.count;
        }
        shape
    }

    /// Elements of `t` (of the current chunk).
    pub fn len(&self, t: TensorId) -> usize {
        self.shape(t).iter().product()
    }

    /// Where a chunk of `t` starts in its buffer: (binding offset in
    /// elements, aligned as bindings must be; first element of the chunk).
    fn chunk_range(&self, t: TensorId, chunk: &Chunk) -> (usize, usize) {
        let layout = self.graph.layout(t);
        let start = layout.offset + chunk.first * layout.sample_stride;
        let align = (self.gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        (start - start % align, start)
    }

    pub fn binding(&self, t: TensorId) -> Binding {
        let whole = self.bindings[t.0]
            .clone()
            .expect("every tensor is bound before ops are planned");
        let Some(chunk) = self.chunk_of(t) else {
            return whole;
        };
        let (base, start) = self.chunk_range(t, chunk);
        let tensor = self.graph.tensor(t);
        let end =
            start + (chunk.count - 1) * self.graph.layout(t).sample_stride + tensor.sample_len();
        let elements = tensor.dtype.bytes(1);
        Binding {
            offset: whole.offset + base as u64 * elements,
            size: (end - base) as u64 * elements,
            buffer: whole.buffer,
        }
    }

    /// `[offset, sample stride]` in elements, for a kernel's uniform: where
    /// each sample of `t` starts in its binding (see `graph::Layout`).
    pub fn layout(&self, t: TensorId) -> [u32; 2] {
        let l = self.graph.layout(t);
        let offset = match self.chunk_of(t) {
            Some(chunk) => {
                let (base, start) = self.chunk_range(t, chunk);
                start - base
            }
            None => l.offset,
        };
        [offset as u32, l.sample_stride as u32]
    }

    /// How to cut the batch so that every tensor in `batched` binds within
    /// the adapter's limit: `(first, count)` per chunk, as even as can be;
    /// one chunk when everything fits.
    pub fn batch_chunks(&self, batched: &[TensorId]) -> Result<Vec<(usize, usize)>> {
        let batch = self.graph.shape(batched[0])[0];
        let max_binding = self.gpu.max_binding() as usize;
        let align = self.gpu.limits.min_storage_buffer_offset_alignment as usize;
        let mut most = batch;
        for &t in batched {
            let tensor = self.graph.tensor(t);
            let element = tensor.dtype.bytes(1) as usize;
            let sample = element * tensor.sample_len();
            let stride = element * self.graph.layout(t).sample_stride;
            if sample + align > max_binding {
                bail!(
                    "one sample of {:?} needs {sample} bytes, more than the adapter's largest \
                     storage binding ({max_binding} bytes); try a smaller --resize",
                    tensor.shape
                );
            }
            most = most.min((max_binding - align - sample) / stride + 1);
        }
        let chunks = batch.div_ceil(most);
        Ok((0..chunks)
            .map(|c| {
                let first = c * batch / chunks;
                (first, (c + 1) * batch / chunks - first)
            })
            .collect())
    }

    /// Runs `plan` once per chunk of the batch (see `batch_chunks`), each
    /// time with `batched` narrowed to that chunk; passes the chunk index.
    pub fn for_each_chunk(
        &mut self,
        batched: &[TensorId],
        mut plan: impl FnMut(&mut Self, usize) -> Result<()>,
    ) -> Result<()> {
        let chunks = self.batch_chunks(batched)?;
        // A channel slice is bound through its whole concatenation unless
        // it is seen as a chunk, which binds only the slice's range.
        let max_binding = self.gpu.max_binding();
        let binds_whole = |t: &TensorId| self.binding(*t).size <= max_binding;
        if chunks.len() == 1 && batched.iter().all(binds_whole) {
            return plan(self, 0);
        }
        log::info!("{}: {} batch chunks", self.label, chunks.len());
        for (i, &(first, count)) in chunks.iter().enumerate() {
            self.chunk = Some(Chunk {
                first,
                count,
                batched: batched.to_vec(),
            });
            let planned = plan(self, i);
            self.chunk = None;
            planned?;
        }
        Ok(())
    }

    /// The bindings of `tensors`, each paired with its shader slot, ready
    /// for `dispatch` (scratch bindings may be pushed on).
    pub fn bind(&self, tensors: &[(u32, TensorId)]) -> Vec<(u32, Binding)> {
        tensors
            .iter()
            .map(|&(slot, t)| (slot, self.binding(t)))
            .collect()
    }

    /// Memory for intermediates that only this op's own dispatches read
    /// (packed matrices, split-K partial sums); other ops reuse it.
    pub fn scratch(&mut self, bytes: u64) -> Result<Binding> {
        let slot = self.scratch_requests;
        self.scratch_requests += 1;
        if slot == self.scratch.len() {
            let stand_in = self
                .gpu
                .storage_buffer(&format!("scratch {slot} (stand-in)"), 4)?;
            self.scratch.push(ScratchSlot { stand_in, bytes: 0 });
        }
        let size = bytes.max(4).next_multiple_of(4);
        let slot = &mut self.scratch[slot];
        slot.bytes = slot.bytes.max(size);
        Ok(Binding {
            buffer: slot.stand_in.clone(),
            offset: 0,
            size,
        })
    }

    /// Allocates the scratch buffers and creates every recorded dispatch's
    /// bind group; returns the dispatches and the scratch buffers.
    fn finish(self, nodes: &[Node]) -> Result<(Vec<Dispatch>, Vec<wgpu::Buffer>)> {
        let mut buffers = Vec::with_capacity(self.scratch.len());
        for (k, slot) in self.scratch.iter().enumerate() {
            buffers.push(
                self.gpu
                    .storage_buffer(&format!("scratch {k}"), slot.bytes)?,
            );
        }
        let real = |b: &wgpu::Buffer| {
            let slot = self.scratch.iter().position(|s| s.stand_in == *b);
            slot.map_or(b, |k| &buffers[k]).clone()
        };
        let bind = |d: &PendingDispatch| {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: d.uniform.as_entire_binding(),
            }];
            let storage: Vec<(u32, Binding)> = (d.storage.iter())
                .map(|(slot, b)| {
                    let buffer = real(&b.buffer);
                    (
                        *slot,
                        Binding {
                            buffer,
                            ..b.clone()
                        },
                    )
                })
                .collect();
            entries.extend(storage.iter().map(|(slot, b)| wgpu::BindGroupEntry {
                binding: *slot,
                resource: b.resource(),
            }));
            let bind_group = self.gpu.bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&d.label),
                layout: &d.pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            Dispatch {
                label: d.label.clone(),
                entry: d.entry,
                node: d.node,
                pipeline: d.pipeline.clone(),
                bind_group,
                workgroups: d.workgroups,
            }
        };
        let mut dispatches = Vec::with_capacity(self.dispatches.len());
        for node in self.dispatches.chunk_by(|a, b| a.node == b.node) {
            let what = || planning(self.graph, &nodes[node[0].node]);
            dispatches.extend(
                self.gpu
                    .scoped(what, || node.iter().map(bind).collect::<Vec<_>>())?,
            );
        }
        Ok((dispatches, buffers))
    }

    /// Records `entry` of `shader` over `invocations` threads, with `params`
    /// as the uniform at binding 0 and `storage` at the given binding slots.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        shader: Shader,
        entry: &'static str,
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
        invocations: usize,
    ) -> Result<()> {
        self.dispatch_with((shader, entry, &[]), params, storage, invocations)
    }

    /// `dispatch` with override constants.
    pub fn dispatch_with<P: bytemuck::Pod>(
        &mut self,
        kernel: (Shader, &'static str, &[(&'static str, u32)]),
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
        invocations: usize,
    ) -> Result<()> {
        let workgroups = self.groups(invocations)?;
        let (shader, entry, constants) = kernel;
        self.dispatch_workgroups(shader, entry, constants, params, storage, grid(workgroups))
    }

    /// Records a tiled kernel: `blocks` rows of workgroups (workgroup_id.y)
    /// with `lanes` invocations each, and the given tile-size constants.
    pub fn dispatch_tiled<P: bytemuck::Pod>(
        &mut self,
        kernel: (Shader, &'static str, &[(&'static str, u32)]),
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
        lanes: usize,
        blocks: usize,
    ) -> Result<()> {
        let lane_groups = self.groups(lanes)?;
        let blocks = self.fit_dimension(blocks)?;
        let (shader, entry, constants) = kernel;
        self.dispatch_workgroups(
            shader,
            entry,
            constants,
            params,
            storage,
            tiled_grid(lane_groups, blocks),
        )
    }

    /// Records `entry` over an explicit grid of workgroups.
    pub fn dispatch_grid<P: bytemuck::Pod>(
        &mut self,
        kernel: (Shader, &'static str, &[(&'static str, u32)]),
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
        workgroups: [usize; 3],
    ) -> Result<()> {
        let [x, y, z] = workgroups;
        let grid = [
            self.fit_dimension(x)?,
            self.fit_dimension(y)?,
            self.fit_dimension(z)?,
        ];
        let (shader, entry, constants) = kernel;
        self.dispatch_workgroups(shader, entry, constants, params, storage, grid)
    }

    /// Records `entry` as exactly one workgroup (tree reductions).
    pub fn dispatch_single<P: bytemuck::Pod>(
        &mut self,
        shader: Shader,
        entry: &'static str,
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
    ) -> Result<()> {
        self.dispatch_workgroups(shader, entry, &[], params, storage, [1, 1, 1])
    }

    /// Workgroups of `tuning.workgroup` invocations covering `invocations`.
    pub fn groups(&self, invocations: usize) -> Result<u32> {
        u32::try_from(invocations.div_ceil(self.gpu.tuning.workgroup as usize))
            .ok()
            .filter(|&g| g <= MAX_GROUPS * MAX_GROUPS)
            .with_context(|| {
                format!(
                    "{}: {invocations} invocations is more than one dispatch can take",
                    self.label
                )
            })
    }

    fn fit_dimension(&self, groups: usize) -> Result<u32> {
        u32::try_from(groups)
            .ok()
            .filter(|&g| g <= MAX_GROUPS)
            .with_context(|| {
                format!(
                    "{}: {groups} workgroups exceed the {MAX_GROUPS} a dimension allows",
                    self.label
                )
            })
    }

    fn dispatch_workgroups<P: bytemuck::Pod>(
        &mut self,
        shader: Shader,
        entry: &'static str,
        constants: &[(&'static str, u32)],
        params: &P,
        storage: &[(u32, impl Borrow<Binding>)],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let device = &self.gpu.device;
        // A kernel may choose its own workgroup size; otherwise the adapter's.
        let mut all_constants = constants.to_vec();
        if !constants.iter().any(|&(name, _)| name == "WG") {
            all_constants.insert(0, ("WG", self.gpu.tuning.workgroup));
        }
        let pipeline = self
            .gpu
            .pipelines
            .get(device, shader, entry, &all_constants);
        let uniform = self.gpu.uniform_buffer(
            &format!("{} params", self.label),
            bytemuck::bytes_of(params),
        );
        let max_binding = self.gpu.max_binding();
        if let Some((_, b)) = storage.iter().find(|(_, b)| b.borrow().size > max_binding) {
            bail!(
                "{}: binds {} bytes at once, more than the adapter's largest storage binding \
                 ({max_binding} bytes); try a smaller --batch-size or --resize",
                self.label,
                b.borrow().size
            );
        }
        self.dispatches.push(PendingDispatch {
            label: format!("{} [{entry}]", self.label),
            entry,
            node: self.node,
            pipeline,
            uniform,
            storage: (storage.iter())
                .map(|(slot, b)| (*slot, b.borrow().clone()))
                .collect(),
            workgroups,
        });
        Ok(())
    }
}

/// The tensors' shapes, comma-separated, for messages.
fn shape_list(graph: &Graph, ids: &[TensorId]) -> String {
    ids.iter()
        .map(|&t| format!("{:?}", graph.shape(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an error while planning `node` is about: the op and its shapes.
fn planning(graph: &Graph, node: &Node) -> String {
    format!(
        "planning {} (inputs {}; outputs {})",
        node.op.describe(),
        shape_list(graph, &node.inputs),
        shape_list(graph, &node.outputs)
    )
}

/// A graph made ready to run: bound memory and recorded dispatches.
/// What one graph node does, for profiles: the op with its tensor shapes,
/// and its floating-point operations per run.
#[derive(Clone, Debug)]
pub struct NodeCost {
    pub label: String,
    pub flops: u64,
}

/// GPU time of one node in one step (all its dispatches).
#[derive(Clone, Debug)]
pub struct NodeTime {
    pub cost: NodeCost,
    pub seconds: f64,
    /// GPU seconds of a run of `Plan::profile`'s reference plan around
    /// this node (nodes with FLOPs).
    pub reference_seconds: Option<f64>,
}

/// What `Plan::profile` times as one compute pass.
enum Profiled<'a> {
    Dispatch(&'a Dispatch),
    Reference(&'a Plan),
}

pub struct Plan {
    dispatches: Vec<Dispatch>,
    /// Per graph node.
    costs: Vec<NodeCost>,
    bindings: Vec<Option<Binding>>,
    _buffers: Vec<wgpu::Buffer>,
    /// Bytes of activation memory this plan allocated.
    pub activation_bytes: u64,
    /// What a buffer per activation tensor would have taken.
    pub unshared_activation_bytes: u64,
    /// Bytes of the scratch buffers all ops share.
    pub scratch_bytes: u64,
}

/// Activation memory: each activation tensor's binding, the buffers, the
/// bytes allocated, and the bytes a buffer per tensor would have taken.
struct Activations {
    bindings: Vec<Option<Binding>>,
    buffers: Vec<wgpu::Buffer>,
    bytes: u64,
    unshared_bytes: u64,
}

/// The nodes between which each activation's storage is in use: from the
/// first node writing it (or a slice of it) to the last reading it (or a
/// view of it). Graph inputs, written before a run, and tensors nothing
/// reads, read after one, live through the whole step.
fn lifetimes(graph: &Graph, nodes: &[Node]) -> Vec<(usize, usize)> {
    let whole_step = (0, usize::MAX);
    let mut life = vec![(usize::MAX, 0); graph.tensors.len()];
    let mut read = vec![false; graph.tensors.len()];
    for (i, node) in nodes.iter().enumerate() {
        for &t in &node.outputs {
            let r = graph.storage_root(t).0;
            life[r] = (life[r].0.min(i), life[r].1.max(i));
        }
        for &t in &node.inputs {
            let r = graph.storage_root(t).0;
            life[r].1 = life[r].1.max(i);
            read[r] = true;
        }
    }
    for (r, l) in life.iter_mut().enumerate() {
        if l.0 == usize::MAX || !read[r] {
            *l = whole_step;
        }
    }
    life
}

/// Gives every activation tensor a buffer: its own, or with
/// `graph.reuse_activations` one freed by a tensor whose last reader ran
/// before this one's first writer, so no node ever reads and writes the
/// same buffer: the smallest free one that fits, else the largest free one,
/// grown. wgpu tracks read and write usage per
/// buffer, so a dispatch may not read one range of a buffer while writing
/// another: tensors cannot share one arena. A buffer may be larger than one
/// binding: ops then bind it a batch chunk at a time.
fn allocate_activations(
    gpu: &Gpu,
    graph: &Graph,
    (nodes, elided): (&[Node], &[bool]),
    producer: &[String],
) -> Result<Activations> {
    let life = lifetimes(graph, nodes);
    let mut order: Vec<usize> = (0..graph.tensors.len())
        .filter(|&i| graph.tensors[i].storage == Storage::Activation)
        .collect();
    order.sort_by_key(|&i| life[i].0);
    let mut a = Activations {
        bindings: vec![None; graph.tensors.len()],
        buffers: Vec::new(),
        bytes: 0,
        unshared_bytes: 0,
    };
    // Sizes first, buffers after: a free buffer too small for the next
    // tensor grows to take it rather than leaving a new one beside it.
    // (slot, node after which it is free)
    let mut in_use: Vec<(usize, usize)> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // Per slot: its bytes and the tensor that needs them all.
    let mut slots: Vec<(u64, usize)> = Vec::new();
    let mut slot_of = vec![None; graph.tensors.len()];
    for i in order {
        let size = graph.tensors[i].bytes().max(4).next_multiple_of(4);
        a.unshared_bytes += size;
        if elided[i] {
            continue;
        }
        let (first, last) = life[i];
        if graph.reuse_activations {
            in_use.retain(|&(b, free_after)| {
                let done = free_after < first;
                if done {
                    free.push(b);
                }
                !done
            });
        }
        let bytes = |k: &usize| slots[free[*k]].0;
        let fitting = (0..free.len())
            .filter(|k| bytes(k) >= size)
            .min_by_key(bytes);
        let b = match fitting.or_else(|| (0..free.len()).max_by_key(bytes)) {
            Some(k) => free.swap_remove(k),
            None => {
                slots.push((0, i));
                slots.len() - 1
            }
        };
        if slots[b].0 < size {
            slots[b] = (size, i);
        }
        slot_of[i] = Some((b, size));
        in_use.push((b, last));
    }
    for &(bytes, i) in &slots {
        let shape = &graph.tensors[i].shape;
        let buffer = gpu
            .storage_buffer(&producer[i], bytes)
            .with_context(|| format!("the output {shape:?} of {}", producer[i]))?;
        a.bytes += bytes;
        a.buffers.push(buffer);
    }
    for (i, slot) in slot_of.into_iter().enumerate() {
        a.bindings[i] = slot.map(|(b, size)| Binding {
            buffer: a.buffers[b].clone(),
            offset: 0,
            size,
        });
    }
    Ok(a)
}

impl Plan {
    pub fn new(
        gpu: &Gpu,
        graph: &Graph,
        params: &ParamStore,
        externals: &Externals,
    ) -> Result<Plan> {
        params.check(graph)?;
        let (nodes, elided) = fusion::fuse_activations(graph);
        let mut producer: Vec<String> = vec!["input".to_string(); graph.tensors.len()];
        for node in &nodes {
            for &t in &node.outputs {
                producer[t.0] = node.op.describe();
            }
        }
        let Activations {
            mut bindings,
            buffers,
            bytes: activation_bytes,
            unshared_bytes,
        } = allocate_activations(gpu, graph, (&nodes, &elided), &producer)?;
        for (i, t) in graph.tensors.iter().enumerate() {
            bindings[i] = match &t.storage {
                Storage::Activation | Storage::View(_) | Storage::ChannelSlice { .. } => continue,
                Storage::Parameter(p) => Some(params.value_binding(*p)),
                Storage::Gradient(p) => Some(params.grad_binding(*p)),
                Storage::State(p) => Some(params.state_binding(*p)),
                Storage::External(key) => {
                    let b = externals
                        .get(key)
                        .with_context(|| format!("no buffer given for external tensor {key:?}"))?;
                    Some(b.clone())
                }
            };
        }
        for i in 0..graph.tensors.len() {
            let id = TensorId(i);
            let root = graph.storage_root(id);
            if root == id {
                continue;
            }
            let mut b = bindings[root.0]
                .clone()
                .context("view of an unbound tensor")?;
            if graph.is_channel_slice(id) {
                // Kernels find the slice's samples through its layout.
                let (shape, root_shape) = (graph.shape(id), graph.shape(root));
                if shape.first() != root_shape.first() {
                    bail!("a view {shape:?} of a channel slice of {root_shape:?} must keep the batch dimension");
                }
            } else {
                b.size = graph.tensors[i].bytes().max(4);
            }
            bindings[i] = Some(b);
        }
        let mut ctx = PlanContext {
            gpu,
            graph,
            bindings,
            dispatches: Vec::new(),
            scratch: Vec::new(),
            scratch_requests: 0,
            label: String::new(),
            node: 0,
            chunk: None,
        };
        let mut costs = Vec::with_capacity(nodes.len());
        for (index, node) in nodes.iter().enumerate() {
            ctx.label = node.op.describe();
            ctx.node = index;
            ctx.scratch_requests = 0;
            let mut tensors = node.inputs.iter().chain(&node.outputs);
            if let Some(&t) = tensors.find(|&&t| graph.is_channel_slice(t)) {
                if !node.op.handles_channel_slices() {
                    bail!(
                        "{} cannot read or write {:?}, a channel slice of a concatenation",
                        ctx.label,
                        graph.shape(t)
                    );
                }
            }
            let shapes = |ids: &[TensorId]| shape_list(graph, ids);
            let what = || planning(graph, node);
            let planned = gpu.scoped(what, || match node.op.shared_inputs() {
                // Per-sample work: cut along the batch when a tensor is too
                // large to bind whole.
                Some(shared) => {
                    let batched: Vec<TensorId> = (node.inputs.iter().enumerate())
                        .filter(|(i, _)| !shared.contains(i))
                        .map(|(_, &t)| t)
                        .chain(node.outputs.iter().copied())
                        .collect();
                    ctx.for_each_chunk(&batched, |ctx, _| {
                        node.op.plan(ctx, &node.inputs, &node.outputs)
                    })
                }
                None => node.op.plan(&mut ctx, &node.inputs, &node.outputs),
            })?;
            planned.with_context(what)?;
            let tensors =
                |ids: &[TensorId]| ids.iter().map(|&t| graph.tensor(t)).collect::<Vec<_>>();
            costs.push(NodeCost {
                label: format!(
                    "{} {} -> {}",
                    node.op.describe(),
                    shapes(&node.inputs),
                    shapes(&node.outputs)
                ),
                flops: node
                    .op
                    .flops(&tensors(&node.inputs), &tensors(&node.outputs)),
            });
        }
        let bindings = std::mem::take(&mut ctx.bindings);
        let (dispatches, scratch) = ctx.finish(&nodes)?;
        gpu.check_errors()
            .context("creating the plan's pipelines and bind groups")?;
        let scratch_bytes = scratch.iter().map(wgpu::Buffer::size).sum();
        let mut all_buffers = buffers;
        all_buffers.extend(scratch);
        log::info!(
            "plan: {} nodes, {} dispatches, {activation_bytes} bytes of activations \
             ({unshared_bytes} without sharing buffers), {scratch_bytes} bytes of scratch",
            nodes.len(),
            dispatches.len(),
        );
        Ok(Plan {
            dispatches,
            costs,
            bindings,
            _buffers: all_buffers,
            activation_bytes,
            unshared_activation_bytes: unshared_bytes,
            scratch_bytes,
        })
    }

    pub fn binding(&self, t: TensorId) -> &Binding {
        self.bindings[t.0]
            .as_ref()
            .expect("planned tensors are bound")
    }

    /// Records every dispatch into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for d in &self.dispatches {
            d.record(pass);
        }
    }

    /// The shader entry point of every dispatch, in order: which kernels
    /// the ops chose.
    pub fn entry_points(&self) -> Vec<&'static str> {
        self.dispatches.iter().map(|d| d.entry).collect()
    }

    /// Floating-point operations of one run (see `Op::flops`).
    pub fn flops(&self) -> u64 {
        self.costs.iter().map(|c| c.flops).sum()
    }

    /// GPU seconds of every node that dispatches work, from timestamp
    /// queries around one compute pass per dispatch (needs
    /// `Features::TIMESTAMP_QUERY`). A whole run of the `reference` plan is
    /// timed the same way before each node with FLOPs and after the last
    /// dispatch, and each such node carries the mean of the runs just
    /// before and after it: a rate to compare the node's with, taken under
    /// the same load (a shared machine's speed swings within seconds).
    pub fn profile(&self, gpu: &Gpu, reference: &Plan) -> Result<Vec<NodeTime>> {
        if !gpu
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            bail!("adapter {:?} has no timestamp queries", gpu.info.name);
        }
        let seconds_per_tick = f64::from(gpu.queue.get_timestamp_period()) * 1e-9;
        let (passes, run_before) = self.profiled_passes(reference);
        let mut seconds = vec![0.0; self.costs.len()];
        let mut reference_runs = Vec::new();
        // A query set holds at most 4096 queries: two per pass.
        for chunk in passes.chunks(2048) {
            let count = 2 * chunk.len() as u32;
            let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
            let resolved = gpu.buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps"),
                size: 8 * u64::from(count),
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            for (i, timed) in chunk.iter().enumerate() {
                let label = match timed {
                    Profiled::Dispatch(d) => &d.label,
                    Profiled::Reference(_) => "reference",
                };
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &queries,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                match timed {
                    Profiled::Dispatch(d) => d.record(&mut pass),
                    Profiled::Reference(plan) => plan.record(&mut pass),
                }
            }
            encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
            gpu.queue.submit([encoder.finish()]);
            let bytes = gpu.read_bytes(&resolved, 0, 8 * u64::from(count))?;
            let ticks: &[u64] = bytemuck::cast_slice(&bytes);
            for (timed, t) in chunk.iter().zip(ticks.chunks_exact(2)) {
                let elapsed = t[1].saturating_sub(t[0]) as f64 * seconds_per_tick;
                match timed {
                    Profiled::Dispatch(d) => seconds[d.node] += elapsed,
                    Profiled::Reference(_) => reference_runs.push(elapsed),
                }
            }
        }
        let dispatching: std::collections::HashSet<usize> =
            self.dispatches.iter().map(|d| d.node).collect();
        let around = |run: usize| (reference_runs[run] + reference_runs[run + 1]) / 2.0;
        Ok((self.costs.iter().zip(seconds).zip(run_before).enumerate())
            .filter(|(node, _)| dispatching.contains(node))
            .map(|(_, ((cost, seconds), run))| NodeTime {
                cost: cost.clone(),
                seconds,
                reference_seconds: run.map(around),
            })
            .collect())
    }

    /// The passes `profile` times, in order: every dispatch, and a run of
    /// `reference` before each node with FLOPs and after the last. Also,
    /// per node, the reference run just before it.
    fn profiled_passes<'a>(
        &'a self,
        reference: &'a Plan,
    ) -> (Vec<Profiled<'a>>, Vec<Option<usize>>) {
        let mut passes = Vec::new();
        let mut run_before = vec![None; self.costs.len()];
        let mut runs = 0;
        for (i, d) in self.dispatches.iter().enumerate() {
            let starts_node = i == 0 || self.dispatches[i - 1].node != d.node;
            if starts_node && self.costs[d.node].flops > 0 {
                run_before[d.node] = Some(runs);
                passes.push(Profiled::Reference(reference));
                runs += 1;
            }
            passes.push(Profiled::Dispatch(d));
        }
        if runs > 0 {
            passes.push(Profiled::Reference(reference));
        }
        (passes, run_before)
    }

    /// One step: one command encoder, one compute pass, one submit.
    pub fn run(&self, gpu: &Gpu) -> wgpu::SubmissionIndex {
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("step"),
                timestamp_writes: None,
            });
            self.record(&mut pass);
        }
        gpu.queue.submit([encoder.finish()])
    }

    pub fn write_f32(&self, gpu: &Gpu, graph: &Graph, t: TensorId, values: &[f32]) -> Result<()> {
        let tensor = graph.tensor(t);
        if tensor.dtype != DType::F32 || tensor.len() != values.len() {
            bail!(
                "tensor {:?} has shape {:?}, got {} values",
                t,
                tensor.shape,
                values.len()
            );
        }
        let b = self.binding(t);
        gpu.queue
            .write_buffer(&b.buffer, b.offset, bytemuck::cast_slice(values));
        Ok(())
    }

    pub fn write_u32(&self, gpu: &Gpu, t: TensorId, values: &[u32]) {
        let b = self.binding(t);
        gpu.queue
            .write_buffer(&b.buffer, b.offset, bytemuck::cast_slice(values));
    }

    pub fn read_f32(&self, gpu: &Gpu, graph: &Graph, t: TensorId) -> Result<Vec<f32>> {
        let b = self.binding(t);
        gpu.read_f32(&b.buffer, b.offset, graph.tensor(t).len())
    }

    pub fn read_u32(&self, gpu: &Gpu, graph: &Graph, t: TensorId) -> Result<Vec<u32>> {
        let b = self.binding(t);
        let bytes = gpu.read_bytes(&b.buffer, b.offset, 4 * graph.tensor(t).len() as u64)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }
}
