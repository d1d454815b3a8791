//! Plumbing for the register-tiled kernels of `shaders/gemm_blocked.wgsl`
//! (the matrix product and convolutions on CPU adapters): their uniform, the
//! pass that packs an operand k-major, and the dispatch grid.

use super::fused::activation_constant;
use super::Activation;
use crate::gpu::{tiled_grid, GemmKernel, Shader, MAX_GROUPS};
use crate::graph::{Binding, PlanContext};
use anyhow::Result;

/// Columns of C per invocation.
const TILE_COLUMNS: u32 = 16;

/// Rows of C per workgroup: 32, or 8 or 16 for matrices with that few rows
/// (LeNet's 6 and 16 channels), where a 32-row tile would be mostly padding;
/// 24 for 33 to 48 rows, which take two 24-row tiles where two of 32 would
/// leave a quarter or more of the rows padding and three of 16 gather B
/// three times (GoogLeNet's 5x5 16 -> 48 convolution at batch 128 on
/// lavapipe, against 16-row tiles: forward 7.7-7.8 -> 6.6-6.7 ms, filter
/// gradient 6.9-7.2 -> 6.6-6.8 ms; its 48 -> 128 data gradient 17.3 -> 13.4
/// ms in the model; 32-row tiles took 7.9-8.0 and 7.9-8.3 ms).
fn tile_rows(rows: u32) -> u32 {
    match rows {
        0..=8 => 8,
        9..=16 => 16,
        33..=48 => 24,
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
    pub dst_plane: u32,
    pub dst_w: u32,
    pub dst_row: u32,
    pub dst_step: u32,
    pub dst_first: u32,
    pub row_segments: u32,
    pub out_at: [u32; 2],
    pub x_at: [u32; 2],
    pub dy_at: [u32; 2],
    pub act_at: [u32; 2],
}

const _: () = assert!(std::mem::size_of::<BlockedParams>() == 128);

impl BlockedParams {
    /// C as a row-major matrix (`out_plane` = N) or a whole NCHW tensor
    /// (`out_plane` pixels per channel) at layout `out_at`.
    pub fn contiguous_output(self, out_plane: u32, out_at: [u32; 2]) -> BlockedParams {
        BlockedParams {
            out_plane,
            dst_plane: out_plane,
            dst_w: out_plane,
            dst_row: 0,
            dst_step: 1,
            dst_first: 0,
            out_at,
            ..self
        }
    }

    /// Whether the tiles' stores can be vec4s (the shader's `QUAD_STORES`):
    /// every four columns from a multiple of four on lie in four
    /// consecutive floats of C from a multiple of four on. `conv_rows`'s
    /// columns are pixels of an output row, the other kernels' a sample's
    /// pixels (or a matrix row) as `column_offsets` places them: whole
    /// rows of `dst_w`, so four columns never straddle two samples when
    /// `dst_w` is a multiple of four.
    pub fn stores_whole_quads(&self) -> bool {
        let quads = |values: &[u32]| values.iter().all(|v| v.is_multiple_of(4));
        let starts = quads(&[
            self.out_at[0],
            self.out_at[1],
            self.dst_plane,
            self.dst_first,
        ]);
        if self.row_segments > 0 {
            return starts && quads(&[self.out_w]);
        }
        starts && self.dst_step == 1 && quads(&[self.dst_w, self.dst_row])
    }

    /// Whether the filter gradient can read x four pixels of a channel at
    /// a time (`conv_filter_gradient_pointwise`): a pointwise convolution
    /// (1x1, stride 1, no padding) whose planes and layout are whole vec4s.
    pub fn reads_pixel_quads(&self) -> bool {
        let pointwise = (self.kh, self.kw, self.stride_h, self.stride_w) == (1, 1, 1, 1)
            && (self.pad_h, self.pad_w) == (0, 0);
        let quads = [self.pixels, self.x_at[0], self.x_at[1]];
        pointwise && quads.iter().all(|v| v.is_multiple_of(4))
    }

    /// Bytes of A as the kernels read it: padded rows, k-major.
    fn a_bytes(&self) -> u64 {
        16 * u64::from(self.a_quads) * u64::from(self.k)
    }

    /// Whether `convolve` can read x four columns at a time (the shader's
    /// `POINTWISE`): a 1x1 kernel with stride 1 and no padding over a plane
    /// of output pixels the size of x's (a data gradient's phase may be
    /// smaller), planes of whole vec4s.
    pub fn reads_whole_quads(&self) -> bool {
        let pointwise = (self.kh, self.kw, self.stride_h, self.stride_w) == (1, 1, 1, 1)
            && (self.pad_h, self.pad_w) == (0, 0)
            && (self.out_w, self.out_plane) == (self.x_w, self.x_h * self.x_w);
        let quads = [self.x_h * self.x_w, self.x_at[0], self.x_at[1]];
        pointwise && quads.iter().all(|v| v.is_multiple_of(4))
    }
}

/// The shader's `Pack` uniform: which matrix `X[rows][k]` to pack.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PackParams {
    rows: u32,
    k: u32,
    rows_padded: u32,
    row_stride: u32,
    col_stride: u32,
    taps: u32,
    offset: u32,
    tap_w: u32,
    tap_y0: i32,
    tap_x0: i32,
    tap_dy: i32,
    tap_dx: i32,
    kernel_w: u32,
    _pad: [u32; 3],
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
        let matrix = PackParams {
            rows,
            k,
            rows_padded,
            row_stride,
            col_stride,
            taps: 1,
            tap_w: 1,
            ..PackParams::default()
        };
        if col_stride != 1 {
            return matrix;
        }
        // Rows stored row-major: all of k is one run of taps.
        PackParams {
            taps: k,
            tap_w: k,
            tap_dx: 1,
            ..matrix
        }
    }

    /// The taps `(first.0 + step.0 * ty, first.1 + step.1 * tx)`,
    /// `ty < taps.0`, `tx < taps.1`, of a conv weight `[c_out, c_in, kh,
    /// kw]` as `X[ci][(co, ty, tx)]`: the A of one phase of the data
    /// gradient (flipped: negative steps).
    pub fn weight_taps(
        weight: [u32; 4],
        taps: (u32, u32),
        first: (i32, i32),
        step: (i32, i32),
    ) -> PackParams {
        let [c_out, c_in, kh, kw] = weight;
        PackParams {
            rows: c_in,
            k: c_out * taps.0 * taps.1,
            rows_padded: padded_rows(c_in),
            row_stride: kh * kw,
            col_stride: c_in * kh * kw,
            taps: taps.0 * taps.1,
            tap_w: taps.1,
            tap_y0: first.0,
            tap_x0: first.1,
            tap_dy: step.0,
            tap_dx: step.1,
            kernel_w: kw,
            ..PackParams::default()
        }
    }
}

impl PackParams {
    /// An NCHW tensor (samples at `at`: offset, sample stride) as
    /// `X[channel][(sample, pixel)]`: the A of the filter gradient.
    fn channels_by_pixels(channels: u32, pixels: u32, samples: u32, at: [u32; 2]) -> PackParams {
        PackParams {
            rows: channels,
            k: samples * pixels,
            rows_padded: padded_rows(channels),
            row_stride: pixels,
            col_stride: at[1],
            taps: pixels,
            offset: at[0],
            tap_w: pixels,
            tap_dx: 1,
            ..PackParams::default()
        }
    }

    /// Whether x is already `X` k-major: `X[i][kk]` at `kk * rows + i`.
    fn stored_k_major(&self) -> bool {
        self.taps == 1 && self.row_stride == 1 && self.col_stride == self.rows && self.offset == 0
    }

    /// Whether `pack_planes_k_major` can move this one four by four: each
    /// group of `taps` consecutive k is a run of consecutive elements, and
    /// the runs, rows and offset start on whole vec4s.
    fn in_vec4_runs(&self) -> bool {
        let runs = self.tap_dx == 1 && self.tap_x0 == 0 && self.tap_w == self.taps;
        let one_group = self.k == self.taps;
        runs && (one_group || self.col_stride.is_multiple_of(4))
            && [self.taps, self.row_stride, self.offset]
                .iter()
                .all(|v| v.is_multiple_of(4))
    }
}

/// `X` as the kernels read A (and `matmul` B): k-major, rows padded to the
/// tile with zeros. A matrix already stored that way is bound as it is;
/// runs of whole vec4s (a row-major matrix's rows, an NCHW tensor's planes)
/// are moved four by four, other groups of taps (planes of 3x3 pixels, a
/// weight's taps) one group per invocation.
pub fn packed_k_major(ctx: &mut PlanContext, x: Binding, p: PackParams) -> Result<Binding> {
    if p.stored_k_major() && p.rows == p.rows_padded {
        return Ok(x);
    }
    let len = p.rows_padded as usize * p.k as usize;
    let packed = ctx.scratch(4 * len.max(4) as u64)?;
    if len == 0 {
        return Ok(packed);
    }
    if p.in_vec4_runs() {
        let storage = [(8, x), (9, packed.clone())];
        ctx.dispatch(
            Shader::GemmBlocked,
            "pack_planes_k_major",
            &p,
            &storage,
            len / 16,
        )?;
        return Ok(packed);
    }
    let storage = [(5, x), (6, packed.clone())];
    // Several groups (a matrix stored row-major is one group, which would
    // leave one lane per row).
    if p.k > p.taps {
        let groups = len / p.taps as usize;
        let entry = "pack_groups_k_major";
        ctx.dispatch(Shader::GemmBlocked, entry, &p, &storage, groups)?;
        return Ok(packed);
    }
    ctx.dispatch(Shader::GemmBlocked, "pack_k_major", &p, &storage, len)?;
    Ok(packed)
}

/// An operand of `matmul` (`X[rows][k]` as `p` describes it) and its vec4s
/// per k: a matrix already stored k-major with whole vec4s per k is bound
/// as it is, its short last tile read clamped by the kernel; any other is
/// packed by `packed_k_major`.
pub fn k_major_operand(ctx: &mut PlanContext, x: Binding, p: PackParams) -> Result<(Binding, u32)> {
    if p.stored_k_major() && p.rows.is_multiple_of(4) {
        return Ok((x, p.rows / 4));
    }
    Ok((packed_k_major(ctx, x, p)?, p.rows_padded / 4))
}

/// An NCHW tensor `x` with `channels` planes of `pixels` per sample, its
/// samples at `at` (offset, sample stride), packed as `X[channel][(sample,
/// pixel)]`: the A of a filter gradient.
pub fn packed_channels_by_pixels(
    ctx: &mut PlanContext,
    x: Binding,
    (channels, pixels, samples): (u32, u32, u32),
    at: [u32; 2],
) -> Result<Binding> {
    let p = PackParams::channels_by_pixels(channels, pixels, samples, at);
    packed_k_major(ctx, x, p)
}

/// Output pixels per row segment of `conv_rows`: an invocation's columns.
const ROW_SEGMENT: u32 = TILE_COLUMNS;

/// Kernels `conv_rows` takes: it shifts the taps of a row out of 20 floats.
const MAX_ROW_TAPS: u32 = 5;

/// Lanes of a `conv_rows_filter_gradient` workgroup (the SIMD width of CPU
/// adapters), and the most output channels it sums.
const FILTER_LANES: u32 = 8;

/// A stride-1 convolution as `conv_rows` computes it: input `[samples,
/// channels, h, w]` at layout `x_at`, zero-padded by `pad`, a `kernel` at
/// most `MAX_ROW_TAPS` wide, `rows` output channels of `out` pixels at
/// layout `out_at`.
pub struct RowConv {
    pub samples: u32,
    pub channels: u32,
    pub input: (u32, u32),
    pub pad: (u32, u32),
    pub kernel: (u32, u32),
    pub rows: u32,
    pub out: (u32, u32),
    pub x_at: [u32; 2],
    pub out_at: [u32; 2],
}

/// The shader's `RowPadding` uniform.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowPadding {
    rows_per_sample: u32,
    w: u32,
    padded_w: u32,
    pad_w: u32,
    rows: u32,
    _pad: u32,
    at: [u32; 2],
}

impl RowConv {
    /// Floats per padded input row: every segment's 16 pixels plus the
    /// four more its last taps read.
    fn padded_w(&self) -> u32 {
        self.out.1.div_ceil(ROW_SEGMENT) * ROW_SEGMENT + 4
    }

    /// Floats per padded sample.
    fn padded_sample(&self) -> u32 {
        self.channels * self.input.0 * self.padded_w()
    }

    fn padded_bytes(&self) -> u64 {
        4 * self.samples as u64 * self.padded_sample() as u64
    }

    /// Whether `conv_rows` can take this convolution in workgroups of
    /// `workgroup` lanes on `ctx`'s adapter, and is expected to beat
    /// `convolve`, as measured on lavapipe with LeNet's and GoogLeNet's
    /// shapes: output rows that fill less than three quarters of their
    /// 16-pixel segments lose, and so do tiles of more than 8 rows (16
    /// output channels of a 5x5 forward pass: 25.5 against 18.7 ms;
    /// GoogLeNet's 5x5 data gradients into 16 and 32 channels: 24.7 against
    /// 16.5 ms and 129 against 78 ms). With 8 rows it wins: LeNet's
    /// second data gradient takes 6.4 ms where `convolve` takes 18.7. A 1x1
    /// kernel is a plain matrix product.
    pub fn chosen(&self, ctx: &PlanContext, workgroup: u32) -> bool {
        let w = self.out.1;
        let filled = 4 * w >= 3 * w.next_multiple_of(ROW_SEGMENT);
        let lanes = self.samples * self.out.1.div_ceil(ROW_SEGMENT);
        filled
            && tile_rows(self.rows) == 8
            && (2..=MAX_ROW_TAPS).contains(&self.kernel.1)
            && self.padded_bytes() <= ctx.gpu.max_binding()
            && lanes.div_ceil(workgroup) <= MAX_GROUPS
            && self.out.0 <= MAX_GROUPS
    }

    fn segments(&self) -> u32 {
        self.out.1.div_ceil(ROW_SEGMENT)
    }

    /// The kernels' uniform with this convolution's geometry.
    fn params(&self) -> BlockedParams {
        BlockedParams {
            k: self.channels * self.kernel.0 * self.kernel.1,
            x_h: self.input.0,
            x_w: self.padded_w(),
            kh: self.kernel.0,
            kw: self.kernel.1,
            out_w: self.out.1,
            pad_h: self.pad.0 as i32,
            row_segments: self.segments(),
            x_at: [0, self.padded_sample()],
            ..BlockedParams::default()
        }
    }

    /// Records `pad_rows`: x's rows zero-padded into scratch memory.
    fn padded_rows(&self, ctx: &mut PlanContext, x: Binding) -> Result<Binding> {
        let padded = ctx.scratch(self.padded_bytes())?;
        let padding = RowPadding {
            rows_per_sample: self.channels * self.input.0,
            w: self.input.1,
            padded_w: self.padded_w(),
            pad_w: self.pad.1,
            rows: self.samples * self.channels * self.input.0,
            _pad: 0,
            at: self.x_at,
        };
        let storage = [(7, x), (11, padded.clone())];
        let rows = padding.rows as usize;
        ctx.dispatch(Shader::GemmBlocked, "pad_rows", &padding, &storage, rows)?;
        Ok(padded)
    }

    /// Whether `conv_rows_filter_gradient` takes this convolution's filter
    /// gradient with dy laid out at `out_at`: kernels at most 5 x 5 and 2
    /// wide, dy's rows and layout whole vec4s, and at most `FILTER_LANES`
    /// output channels, where the blocked kernel's tile rows would be
    /// mostly padding (LeNet's first layer on lavapipe: 8.3 ms for the
    /// whole gradient there, 2.3-2.8 here; wider layers keep the blocked
    /// kernel).
    pub fn filter_gradient_fits(&self, ctx: &PlanContext) -> bool {
        let [offset, stride] = self.out_at;
        self.rows <= FILTER_LANES
            && self.kernel.0 <= MAX_ROW_TAPS
            && (2..=MAX_ROW_TAPS).contains(&self.kernel.1)
            && [self.out.1, offset, stride]
                .iter()
                .all(|v| v.is_multiple_of(4))
            && self.padded_bytes() <= ctx.gpu.max_binding()
    }

    /// Terms of the filter gradient's sum: 16-pixel segments of dy's rows.
    fn filter_gradient_terms(&self) -> u32 {
        self.samples * self.out.0 * self.segments()
    }

    /// Lanes of `conv_rows_filter_gradient` (whole workgroups of them) that
    /// sum `k_split` terms each: its pieces, and the partial sums it writes.
    pub fn filter_gradient_splits(&self, k_split: u32) -> u32 {
        (self.filter_gradient_terms())
            .div_ceil(k_split)
            .next_multiple_of(FILTER_LANES)
    }

    /// Records the padding pass and `conv_rows_filter_gradient` in `splits`
    /// (from `filter_gradient_splits`) pieces of `k_split` terms, one per
    /// lane (those past the last term sum nothing), writing partial sums to
    /// slices `first_split..` of `partial`; dy is laid out at `out_at`.
    pub fn plan_filter_gradient(
        &self,
        ctx: &mut PlanContext,
        (x, dy, partial): (Binding, Binding, Binding),
        (first_split, splits, k_split): (u32, u32, u32),
    ) -> Result<()> {
        let padded = self.padded_rows(ctx, x)?;
        let params = BlockedParams {
            m: self.rows,
            n: self.channels,
            k: self.filter_gradient_terms(),
            pixels: self.out.0 * self.out.1,
            k_split,
            first_split,
            dy_at: self.out_at,
            ..self.params()
        };
        let constants = [
            ("WG", FILTER_LANES),
            ("KH", self.kernel.0),
            ("KW", self.kernel.1),
            ("CHANNELS", self.rows),
        ];
        let storage = [(4, partial), (10, padded), (12, dy)];
        let shader = (
            Shader::GemmBlocked,
            "conv_rows_filter_gradient",
            &constants[..],
        );
        let grid = [splits / FILTER_LANES, self.channels, 1];
        ctx.dispatch_grid(shader, &params, &storage, grid.map(|g| g as usize))
    }

    /// Records the padding pass and `conv_rows` (`conv_rows_bias` with a
    /// bias) writing `y`; `packed_weight` is the kernel's A, k-major. The
    /// stores apply `activation`, or its backward given its output and
    /// layout (`act_out`, a data gradient's `through`).
    pub fn plan(
        &self,
        ctx: &mut PlanContext,
        (workgroup, activation): (u32, Option<Activation>),
        packed_weight: Binding,
        (bias, act_out): (Option<Binding>, Option<(Binding, [u32; 2])>),
        (x, y): (Binding, Binding),
    ) -> Result<()> {
        let padded = self.padded_rows(ctx, x)?;
        let mut params = BlockedParams {
            m: self.rows,
            n: self.samples * self.segments(),
            a_quads: padded_rows(self.rows) / 4,
            ..self.params()
        }
        .contiguous_output(self.out.0 * self.out.1, self.out_at);
        let mut storage = vec![(1, packed_weight), (4, y), (10, padded)];
        if let Some((act_out, act_at)) = act_out {
            storage.push((ACT_OUT, act_out));
            params.act_at = act_at;
        }
        let entry = match bias {
            Some(bias) => {
                storage.push((3, bias));
                "conv_rows_bias"
            }
            None => "conv_rows",
        };
        let grid = [
            params.n.div_ceil(workgroup),
            padded_rows(self.rows) / tile_rows(self.rows),
            self.out.0,
        ];
        let lanes = (workgroup, 1);
        let constants = [
            ("KW", self.kernel.1),
            ("QUAD_STORES", params.stores_whole_quads() as u32),
        ];
        record(
            ctx,
            (entry, activation),
            lanes,
            (&params, &constants),
            &storage,
            grid,
        )
    }
}

/// Records `entry` over the tiles of `params`' M x N output: lane groups
/// along x (folded into z past the grid limit) and row tiles along y, or
/// the other way round (lane groups along y and z) where the adapter's
/// tuning walks this A row tiles first; the kernel applies `activation` to
/// what it stores, and takes `more` pipeline constants.
pub fn dispatch(
    ctx: &mut PlanContext,
    (entry, activation): (&'static str, Option<Activation>),
    workgroup: u32,
    (params, more): (&BlockedParams, &[(&'static str, u32)]),
    storage: &[(u32, Binding)],
) -> Result<()> {
    let (lane_groups, row_tiles) = tiles(params, workgroup);
    let [x, y, z] = tiled_grid(lane_groups, row_tiles);
    let rows_first = matches!(ctx.gpu.tuning.gemm,
        GemmKernel::Blocked { rows_first_bytes, .. } if params.a_bytes() <= rows_first_bytes);
    let grid = if rows_first { [y, x, z] } else { [x, y, z] };
    let lanes = (workgroup, 1);
    let mut constants = vec![
        ("QUAD_STORES", params.stores_whole_quads() as u32),
        ("POINTWISE", params.reads_whole_quads() as u32),
        ("ROWS_FIRST", rows_first as u32),
    ];
    constants.extend_from_slice(more);
    let storage = with_quad_view(ctx, storage, (7, 14))?;
    record(
        ctx,
        (entry, activation),
        lanes,
        (params, &constants),
        &storage,
        grid,
    )
}

/// How `conv_filter_gradient` lays a filter's taps over its lanes: each
/// lane takes the whole kernel rows of `window` taps (1 where a kernel row
/// is wider than a tile) that fit in a tile's columns, and slides them
/// along x by `step` (the stride) from one output pixel to the next.
#[derive(Clone, Copy, Debug)]
pub struct TapWindows {
    pub window: u32,
    pub step: u32,
}

impl TapWindows {
    pub fn new(kw: u32, stride_w: u32) -> TapWindows {
        TapWindows {
            window: if kw <= TILE_COLUMNS { kw } else { 1 },
            step: stride_w,
        }
    }

    /// Lanes across `n` columns, whole windows per lane (the shader's
    /// `window_run`).
    fn column_lanes(&self, n: u32) -> u32 {
        n.div_ceil(TILE_COLUMNS / self.window * self.window)
    }
}

/// The most lanes per column run `conv_filter_gradient_pointwise` takes:
/// a trip takes one panel of A, 8 / K_LANES k, four at a time.
const MOST_PIXEL_QUAD_K_LANES: u32 = 2;

/// What each lane of `conv_filter_gradient_pointwise` pays for sharing its
/// column run: lanes that walk different K splits take A's panel as a
/// value per lane, not one broadcast for the workgroup, where B's loads
/// are cheap vec4s. With 14 of 16 lanes busy either way, two lanes per run
/// against one: DenseNet's 1x1 224 -> 112 filter gradient 104 -> 84 ms,
/// NiN's 96 -> 96 438 -> 355 ms, GoogLeNet's 528 -> 256 59 -> 45 ms. (The
/// window kernel, whose gathers cost more, lost 6-15% without sharing:
/// VGG's 32 -> 64 and GoogLeNet's 5x5 16 -> 32.)
const POINTWISE_SHARED_RUN_COST: f64 = 1.25;

/// Lanes of a workgroup that share one column run of an `n`-column filter
/// gradient, each summing its own pieces of K, at most `fit`: the fewest (a
/// power of two) that keep 90% of the lanes busy, or failing that the most
/// busy lanes. LeNet's second layer has 10 runs: one lane per run leaves 6
/// of 16 lanes idle, four lanes per run none. The pointwise kernel
/// (`pixel_quads`) takes at most `MOST_PIXEL_QUAD_K_LANES`, and shares runs
/// only where that keeps `POINTWISE_SHARED_RUN_COST` times as many lanes
/// busy as one lane per run.
pub fn k_lanes(n: u32, windows: TapWindows, workgroup: u32, pixel_quads: bool, fit: u32) -> u32 {
    let runs = windows.column_lanes(n);
    let busy = |k: u32| f64::from(runs * k) / f64::from(runs.div_ceil(workgroup / k) * workgroup);
    let (most, cost) = match pixel_quads {
        true => (MOST_PIXEL_QUAD_K_LANES, POINTWISE_SHARED_RUN_COST),
        false => (workgroup, 1.0),
    };
    let choices = (0..=most.min(workgroup).min(fit).ilog2()).map(|e| 1 << e);
    let shared = (choices.clone().find(|&k| busy(k) >= 0.9))
        .unwrap_or_else(|| choices.fold(1, |best, k| if busy(k) > busy(best) { k } else { best }));
    match busy(shared) >= cost * busy(1) {
        true => shared,
        false => 1,
    }
}

/// Records `conv_filter_gradient` over the column runs and row tiles of
/// `params`' M x N output for each of `splits` pieces of K, in workgroups
/// of `workgroup` lanes with `k_lanes` (a power of two, as `k_lanes`
/// chooses) lanes per run; the lane groups must fit one grid
/// dimension. Where `params.reads_pixel_quads()`, its pointwise form, with
/// splits of whole vec4s of pixels.
pub fn dispatch_split(
    ctx: &mut PlanContext,
    (workgroup, k_lanes): (u32, u32),
    (params, windows): (&BlockedParams, TapWindows),
    storage: &[(u32, Binding)],
    splits: u32,
) -> Result<()> {
    let lane_groups = windows.column_lanes(params.n).div_ceil(workgroup / k_lanes);
    let row_tiles = padded_rows(params.m) / tile_rows(params.m);
    let grid = [lane_groups, row_tiles, splits.div_ceil(k_lanes)];
    let lanes = (workgroup, k_lanes);
    if params.reads_pixel_quads() {
        let entry = ("conv_filter_gradient_pointwise", None);
        // x bound as vec4s (x_quads) only.
        let storage: Vec<(u32, Binding)> = (storage.iter())
            .map(|(slot, b)| (if *slot == 7 { 14 } else { *slot }, b.clone()))
            .collect();
        return record(ctx, entry, lanes, (params, &[]), &storage, grid);
    }
    let entry = ("conv_filter_gradient", None);
    let constants = [("WINDOW_W", windows.window), ("WINDOW_STEP", windows.step)];
    record(ctx, entry, lanes, (params, &constants), storage, grid)
}

/// Workgroups of `workgroup` 16-column tiles across the columns, and row
/// tiles down the rows of the output.
fn tiles(params: &BlockedParams, workgroup: u32) -> (u32, u32) {
    let lanes = padded_columns(params.n) / TILE_COLUMNS;
    (
        lanes.div_ceil(workgroup),
        padded_rows(params.m) / tile_rows(params.m),
    )
}

/// `storage` plus the vec4 view (`slots.1`) of the binding at `slots.0`
/// (here c_quads (13) of C (4), x_quads (14) of x (7); batch norm's sums
/// too). A binding smaller than a vec4 is never used as vec4s and binds a
/// stand-in of one.
pub(super) fn with_quad_view(
    ctx: &mut PlanContext,
    storage: &[(u32, Binding)],
    (slot, view_slot): (u32, u32),
) -> Result<Vec<(u32, Binding)>> {
    let mut storage = storage.to_vec();
    if let Some((_, binding)) = storage.iter().find(|(s, _)| *s == slot) {
        let view = match binding.size {
            16.. => binding.clone(),
            _ => ctx.scratch(16)?,
        };
        storage.push((view_slot, view));
    }
    Ok(storage)
}

/// The slot of the activation output that a data gradient's stores carry
/// their results through the backward of (the shader's `act_out`; its vec4
/// view is the next slot).
pub const ACT_OUT: u32 = 15;

/// Records one of the kernels that read A (with `more` pipeline
/// constants), from the shader the adapter's tuning picks. The stores
/// apply `activation`, or its backward where its output is bound at
/// `ACT_OUT` (laid out at `params.act_at`); kernels that store nothing
/// leave both unused.
fn record(
    ctx: &mut PlanContext,
    (entry, activation): (&'static str, Option<Activation>),
    (workgroup, k_lanes): (u32, u32),
    (params, more): (&BlockedParams, &[(&'static str, u32)]),
    storage: &[(u32, Binding)],
    grid: [u32; 3],
) -> Result<()> {
    let backward = storage.iter().any(|(slot, _)| *slot == ACT_OUT);
    let mut constants = vec![
        ("WG", workgroup),
        ("ROW_QUADS", tile_rows(params.m) / 4),
        ("LIVE_ROWS", params.m.min(tile_rows(params.m))),
        ("K_LANES", k_lanes),
        activation_constant(activation),
        ("ACTIVATION_BACKWARD", backward as u32),
    ];
    constants.extend_from_slice(more);
    let mut storage = with_quad_view(ctx, storage, (4, 13))?;
    if !backward {
        storage.push((ACT_OUT, ctx.scratch(16)?));
    }
    let storage = with_quad_view(ctx, &storage, (ACT_OUT, ACT_OUT + 1))?;
    let shader = match ctx.gpu.tuning.gemm {
        GemmKernel::Blocked {
            subgroups: true, ..
        } => Shader::GemmBlockedSubgroup,
        _ => Shader::GemmBlocked,
    };
    ctx.dispatch_grid(
        (shader, entry, &constants[..]),
        params,
        &storage,
        grid.map(|g| g as usize),
    )
}

#[cfg(test)]
mod tests {
    use super::{k_lanes, padded_rows, BlockedParams, TapWindows};

    /// Rows pad to the tile that wastes least: LeNet's 6 and 16 channels
    /// to 8 and 16, 33 to 48 rows to 24-row tiles, more to 32-row ones.
    #[test]
    fn rows_pad_to_the_tile_that_wastes_least() {
        let padded = [6, 16, 20, 33, 40, 48, 49, 112].map(padded_rows);
        assert_eq!(padded, [8, 16, 32, 48, 48, 48, 64, 128]);
    }

    /// LeNet's second filter gradient (150 taps, 10 runs of 15) shares its
    /// runs four lanes each, or as many as fit; the pointwise kernel shares
    /// only where that keeps a quarter more lanes busy.
    #[test]
    fn filter_gradient_lanes_share_runs_where_that_pays() {
        let lenet = TapWindows::new(5, 1);
        assert_eq!(k_lanes(150, lenet, 8, false, 64), 4);
        assert_eq!(k_lanes(150, lenet, 8, false, 2), 2);
        let pointwise = TapWindows::new(1, 1);
        // 14 runs: 14 of 16 lanes busy with one or two lanes a run.
        assert_eq!(k_lanes(224, pointwise, 8, false, 64), 4);
        assert_eq!(k_lanes(224, pointwise, 8, true, 64), 1);
        // 33 runs: 92% busy with two lanes a run, 82% with one.
        assert_eq!(k_lanes(528, pointwise, 8, false, 64), 2);
        assert_eq!(k_lanes(528, pointwise, 8, true, 64), 1);
        // 4 runs: half the lanes idle with one lane a run.
        assert_eq!(k_lanes(64, pointwise, 8, true, 64), 2);
        assert_eq!(k_lanes(64, pointwise, 8, true, 1), 1);
    }

    /// Asserts that `test` holds for `params` and fails after each of
    /// `changes`.
    fn each_change_fails(
        params: BlockedParams,
        test: fn(&BlockedParams) -> bool,
        changes: &[fn(&mut BlockedParams)],
    ) {
        assert!(test(&params));
        for (i, change) in changes.iter().enumerate() {
            let mut changed = params;
            change(&mut changed);
            assert!(!test(&changed), "change {i}");
        }
    }

    /// Each start, step and width of C's layout that is not a whole number
    /// of vec4s turns quad stores off, for the row kernels (`row_segments`)
    /// and the others.
    #[test]
    fn quad_stores_need_every_start_on_a_vec4() {
        let rows = BlockedParams {
            out_w: 28,
            row_segments: 2,
            ..BlockedParams::default()
        }
        .contiguous_output(28 * 28, [8, 6 * 28 * 28]);
        let columns = BlockedParams {
            row_segments: 0,
            dst_w: 12,
            dst_row: 24,
            dst_first: 12,
            ..rows
        };
        let stores = BlockedParams::stores_whole_quads;
        each_change_fails(
            rows,
            stores,
            &[
                |p| p.out_w = 14,
                |p| p.out_at[0] = 2,
                |p| p.out_at[1] += 2,
                |p| p.dst_plane = 30,
            ],
        );
        each_change_fails(
            columns,
            stores,
            &[
                |p| p.out_at[0] = 2,
                |p| p.out_at[1] += 2,
                |p| p.dst_plane = 30,
                |p| p.dst_first = 13,
                |p| p.dst_step = 2,
                |p| p.dst_w = 14,
                |p| p.dst_row = 26,
            ],
        );
    }

    /// Only a 1x1 kernel with stride 1 and no padding, over output planes
    /// the size of x's, on planes and layouts of whole vec4s, reads x four
    /// pixels at a time.
    #[test]
    fn pointwise_reads_need_a_1x1_kernel_on_whole_vec4s() {
        let pointwise = BlockedParams {
            x_h: 6,
            x_w: 6,
            kh: 1,
            kw: 1,
            stride_h: 1,
            stride_w: 1,
            out_w: 6,
            out_plane: 36,
            x_at: [8, 5 * 36],
            ..BlockedParams::default()
        };
        each_change_fails(
            pointwise,
            BlockedParams::reads_whole_quads,
            &[
                |p| p.kh = 3,
                |p| p.kw = 3,
                |p| p.stride_h = 2,
                |p| p.stride_w = 2,
                |p| p.pad_h = 1,
                |p| p.pad_w = 1,
                |p| (p.x_h, p.x_w, p.out_w, p.out_plane) = (5, 5, 5, 25),
                |p| (p.out_w, p.out_plane) = (3, 9),
                |p| p.out_plane = 30,
                |p| p.x_at[0] = 2,
                |p| p.x_at[1] += 2,
            ],
        );
    }
}
