//! Plumbing for the register-tiled kernels of `shaders/gemm_blocked.wgsl`
//! (the matrix product and convolutions on CPU adapters): their uniform, the
//! pass that packs an operand k-major, and the dispatch grid.

use crate::gpu::{tiled_grid, Shader};
use crate::graph::{Binding, PlanContext};
use anyhow::Result;

/// Columns of C per invocation.
const TILE_COLUMNS: u32 = 16;

/// Rows of C per workgroup: 32, or 8 or 16 for matrices with that few rows
/// (LeNet's 6 and 16 channels), where a 32-row tile would be mostly padding.
fn tile_rows(rows: u32) -> u32 {
    match rows {
        0..=8 => 8,
        9..=16 => 16,
        _ => 32,
    }
}

pub fn padded_rows(rows: u32) -> u32 {
    rows.next_multiple_of(tile_rows(rows))
}

pub fn padded_columns(columns: u32) -> u32 {
    columns.next_multiple_of(TILE_COLUMNS)
}

/// The shader's `Blocked` uniform (`out_at` must stay 8-byte aligned, as
/// WGSL aligns a vec2).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockedParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a_quads: u32,
    pub b_quads: u32,
    pub out_plane: u32,
    pub x_h: u32,
    pub x_w: u32,
    pub kh: u32,
    pub kw: u32,
    pub out_w: u32,
    pub stride_h: u32,
    pub stride_w: u32,
    pub pad_h: i32,
    pub pad_w: i32,
    pub pixels: u32,
    pub k_split: u32,
    pub first_split: u32,
    pub out_at: [u32; 2],
    pub x_at: [u32; 2],
}

const _: () = assert!(std::mem::size_of::<BlockedParams>() == 88);

/// The shader's `Pack` uniform: which matrix `X[rows][k]` to pack.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PackParams {
    rows: u32,
    k: u32,
    rows_padded: u32,
    row_stride: u32,
    col_stride: u32,
    taps: u32,
    flip_taps: u32,
    offset: u32,
}

impl PackParams {
    /// `X[i][kk] = x[i * row_stride + kk * col_stride]`, rows padded to
    /// `rows_padded`.
    pub fn matrix(
        rows: u32,
        rows_padded: u32,
        k: u32,
        row_stride: u32,
        col_stride: u32,
    ) -> PackParams {
        PackParams {
            rows,
            k,
            rows_padded,
            row_stride,
            col_stride,
            taps: 1,
            flip_taps: 0,
            offset: 0,
        }
    }

    /// A conv weight `[c_out, c_in, kh, kw]` as `X[ci][(co, ky, kx)]` with
    /// the kernel flipped: the A of the data gradient.
    pub fn flipped_transposed_weight(weight: &[u32; 4]) -> PackParams {
        let [c_out, c_in, kh, kw] = *weight;
        let taps = kh * kw;
        PackParams {
            rows: c_in,
            k: c_out * taps,
            rows_padded: padded_rows(c_in),
            row_stride: taps,
            col_stride: c_in * taps,
            taps,
            flip_taps: 1,
            offset: 0,
        }
    }
}

impl PackParams {
    /// An NCHW tensor (samples at `at`: offset, sample stride) as
    /// `X[channel][(sample, pixel)]`: the A of the filter gradient.
    pub fn channels_by_pixels(
        channels: u32,
        pixels: u32,
        samples: u32,
        at: [u32; 2],
    ) -> PackParams {
        PackParams {
            rows: channels,
            k: samples * pixels,
            rows_padded: padded_rows(channels),
            row_stride: pixels,
            col_stride: at[1],
            taps: pixels,
            flip_taps: 0,
            offset: at[0],
        }
    }
}

/// `X` as the kernels read A (and `matmul` B): k-major, rows padded to the
/// tile with zeros. A matrix already stored that way is bound as it is.
pub fn packed_k_major(ctx: &mut PlanContext, x: Binding, p: PackParams) -> Result<Binding> {
    let in_place = p.taps == 1 && p.row_stride == 1 && p.col_stride == p.rows;
    if in_place && p.rows == p.rows_padded && p.offset == 0 {
        return Ok(x);
    }
    let len = p.rows_padded as usize * p.k as usize;
    let packed = ctx.scratch(4 * len as u64)?;
    let storage = [(5, x), (6, packed.clone())];
    ctx.dispatch(Shader::GemmBlocked, "pack_k_major", &p, &storage, len)?;
    Ok(packed)
}

/// Records `entry` over the tiles of `params`' M x N output: lane groups
/// along x (folded into z past the grid limit), row tiles along y.
pub fn dispatch(
    ctx: &mut PlanContext,
    entry: &'static str,
    workgroup: u32,
    params: &BlockedParams,
    storage: &[(u32, Binding)],
) -> Result<()> {
    let (lane_groups, row_tiles) = tiles(params, workgroup);
    let [x, y, z] = tiled_grid(lane_groups, row_tiles);
    record(ctx, entry, workgroup, params, storage, [x, y, z])
}

/// Records `entry` over the tiles of `params`' M x N output for each of
/// `splits` pieces of K (workgroup_id.z); the lane groups must fit one grid
/// dimension.
pub fn dispatch_split(
    ctx: &mut PlanContext,
    entry: &'static str,
    workgroup: u32,
    params: &BlockedParams,
    storage: &[(u32, Binding)],
    splits: u32,
) -> Result<()> {
    let (lane_groups, row_tiles) = tiles(params, workgroup);
    record(
        ctx,
        entry,
        workgroup,
        params,
        storage,
        [lane_groups, row_tiles, splits],
    )
}

/// Workgroups across the columns and row tiles down the rows of the output.
fn tiles(params: &BlockedParams, workgroup: u32) -> (u32, u32) {
    let lanes = padded_columns(params.n) / TILE_COLUMNS;
    (
        lanes.div_ceil(workgroup),
        padded_rows(params.m) / tile_rows(params.m),
    )
}

fn record(
    ctx: &mut PlanContext,
    entry: &'static str,
    workgroup: u32,
    params: &BlockedParams,
    storage: &[(u32, Binding)],
    grid: [u32; 3],
) -> Result<()> {
    let row_quads = tile_rows(params.m) / 4;
    ctx.dispatch_grid(
        (
            Shader::GemmBlocked,
            entry,
            &[("WG", workgroup), ("ROW_QUADS", row_quads)],
        ),
        params,
        storage,
        grid.map(|g| g as usize),
    )
}
