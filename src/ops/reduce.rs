//! Deterministic sums over batch and positions (bias gradients, and later
//! batch-norm statistics): per-split partial sums, then the splits added in
//! a fixed order. No float atomics, so every run sums in the same order.

use super::CpuTensor;
use crate::gpu::{Gpu, Shader};
use crate::graph::{Binding, DType, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct ReduceParams {
    batch: u32,
    channels: u32,
    spatial: u32,
    splits: u32,
    chunk: u32,
    len: u32,
    /// channel_sums: graph::Layout of the summed tensor; sum_splits: where
    /// the summed values start in each split, and a split's length.
    src_at: [u32; 2],
    /// channel_sums: where this batch chunk's splits start in `partial`.
    first_split: u32,
    _pad: u32,
}

impl ReduceParams {
    pub(super) fn sum_splits(len: usize, splits: usize) -> ReduceParams {
        ReduceParams::sum_split_range(0..len, len, splits)
    }

    /// `sum_splits` of the values `range` of splits `split_len` long.
    pub(super) fn sum_split_range(
        range: std::ops::Range<usize>,
        split_len: usize,
        splits: usize,
    ) -> ReduceParams {
        ReduceParams {
            batch: 0,
            channels: 0,
            spatial: 0,
            splits: splits as u32,
            chunk: 0,
            len: range.len() as u32,
            src_at: [range.start as u32, split_len as u32],
            first_split: 0,
            _pad: 0,
        }
    }
}

/// The longest loop a kernel may run: llvmpipe (lavapipe) ends any shader
/// loop after 65,535 iterations as an infinite-loop guard, silently dropping
/// the rest (tests/ops.rs found it in a 16-million-term filter gradient).
pub(super) const MAX_LOOP_TRIPS: usize = 32_768;

/// How many pieces to cut a sum of `k` terms into when only `tiles`
/// invocations would otherwise run: enough to fill the GPU, each piece at
/// least 64 terms and at most `MAX_LOOP_TRIPS`, and the partial sums
/// (`splits * len` floats) within a quarter of the largest storage binding.
pub(super) fn split_count(k: usize, tiles: usize, len: usize, gpu: &Gpu) -> usize {
    const TARGET_INVOCATIONS: usize = 16_384;
    let by_occupancy = TARGET_INVOCATIONS.div_ceil(tiles.max(1));
    let by_length = k.div_ceil(64);
    let by_memory = (gpu.max_binding() as usize / 4 / 4) / len.max(1);
    let by_loop = k.div_ceil(MAX_LOOP_TRIPS);
    by_occupancy
        .min(by_length)
        .min(by_memory)
        .max(by_loop)
        .max(1)
}

/// For a sum over the batch of `batched` tensors: how many batch chunks
/// their bindings need (see `PlanContext::batch_chunks`) and how many
/// splits each chunk's `spatial`-long samples get, with `tiles` invocations
/// per split and `len` results per split.
pub(super) fn chunked_splits(
    ctx: &PlanContext,
    batched: &[TensorId],
    spatial: usize,
    tiles: usize,
    len: usize,
) -> Result<(usize, usize)> {
    let chunks = ctx.batch_chunks(batched)?;
    let largest = chunks.iter().map(|&(_, count)| count).max().unwrap_or(1);
    let splits = split_count(largest * spatial, tiles, len * chunks.len(), ctx.gpu);
    Ok((chunks.len(), splits))
}

/// Slices that `sum_splits_quads` adds at most. Measured on lavapipe: 2
/// slices of 2.4 M values (ResNet's last 3x3 filter gradients) 9.6 -> 3.9
/// ms as vec4s, 36 slices of 110 K the same, 72 slices of 18 K 1.5 -> 2.2
/// ms.
const MOST_QUAD_SPLITS: u32 = 16;

/// Records `total[i] = sum_s partial[first + s * split_len + i]` (`src_at`
/// = [first, split_len]), four values per invocation where all three are
/// whole numbers of vec4s and the slices few.
pub(super) fn sum_splits(
    ctx: &mut PlanContext,
    p: &ReduceParams,
    partial: &Binding,
    total: &Binding,
) -> Result<()> {
    let quads = [p.len, p.src_at[0], p.src_at[1]]
        .iter()
        .all(|v| v.is_multiple_of(4));
    if quads && p.splits <= MOST_QUAD_SPLITS {
        let storage = [(5, partial), (6, total)];
        let quads = p.len as usize / 4;
        return ctx.dispatch(Shader::Reduce, "sum_splits_quads", p, &storage, quads);
    }
    ctx.dispatch(
        Shader::Reduce,
        "sum_splits",
        p,
        &[(2, partial), (3, total)],
        p.len as usize,
    )
}

/// `x.sum(dim=(0, 2, 3))` for NCHW (or `dim=0` for (N, C)): one value per channel.
#[derive(Debug)]
pub struct ChannelSum;

impl ChannelSum {
    pub fn cpu(x: &CpuTensor) -> Vec<f32> {
        let (n, c) = (x.shape[0], x.shape[1]);
        let spatial = x.data.len() / (n * c);
        let mut out = vec![0.0f32; c];
        for (i, v) in x.data.iter().enumerate() {
            out[(i / spatial) % c] += v;
        }
        out
    }
}

impl Op for ChannelSum {
    fn describe(&self) -> String {
        "channel sum".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let x = &inputs[0].shape;
        if x.len() < 2 {
            bail!("channel sum needs a batch and a channel dimension, got {x:?}");
        }
        Ok(vec![(vec![x[1]], DType::F32)])
    }

    fn handles_channel_slices(&self) -> bool {
        true
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        let x = inputs[0];
        let shape = ctx.shape(x);
        let channels = shape[1];
        let spatial: usize = shape[2..].iter().product();
        let (chunks, splits) = chunked_splits(ctx, &[x], spatial, channels, channels)?;
        let partial = ctx.scratch(4 * (chunks * splits * channels) as u64)?;
        ctx.for_each_chunk(&[x], |ctx, chunk| {
            let at = ctx.layout(x);
            // Counted in vec4s where positions and layout allow.
            let lanes = if [spatial as u32, at[0], at[1]].iter().all(|v| v % 4 == 0) {
                4
            } else {
                1
            };
            let terms = ctx.shape(x)[0] * spatial / lanes;
            let p = ReduceParams {
                batch: ctx.shape(x)[0] as u32,
                channels: channels as u32,
                spatial: (spatial / lanes) as u32,
                splits: splits as u32,
                chunk: terms.div_ceil(splits) as u32,
                len: channels as u32,
                src_at: at.map(|v| v / lanes as u32),
                first_split: (chunk * splits) as u32,
                _pad: 0,
            };
            let (entry, slot) = if lanes == 4 {
                ("channel_sums_quads", 4)
            } else {
                ("channel_sums", 1)
            };
            let storage = [(slot, ctx.binding(x)), (2, partial.clone())];
            ctx.dispatch(Shader::Reduce, entry, &p, &storage, splits * channels)
        })?;
        let total = ReduceParams::sum_splits(channels, chunks * splits);
        sum_splits(ctx, &total, &partial, &ctx.binding(outputs[0]))
    }
}
