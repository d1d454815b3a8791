//! `nn.Linear` (y = x W^T + b, weight `[out, in]`) and the strided matrix
//! product its gradients are made of; both run `shaders/gemm.wgsl`.

use super::blocked::{self, BlockedParams, PackParams};
use super::fused::{activation_constant, Activated, Epilogue};
use super::reduce::MAX_LOOP_TRIPS;
use super::{expect_rank, Activation, ChannelSum, CpuTensor};
use crate::gpu::{GemmKernel, Shader};
use crate::graph::{DType, Graph, Op, PlanContext, Shape, Tensor, TensorId};
use anyhow::{bail, Result};
use std::rc::Rc;

/// Rows and columns of C per invocation: TM and TN in the shader.
const TILE: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    _pad: u32,
}

/// `C = op(A) op(B)` for row-major 2-D A and B, where op transposes when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatMul {
    pub transpose_a: bool,
    pub transpose_b: bool,
}

impl MatMul {
    /// (M, K) of op(A) and (K, N) of op(B).
    fn dims(&self, a: &[usize], b: &[usize]) -> ((usize, usize), (usize, usize)) {
        let oa = if self.transpose_a {
            (a[1], a[0])
        } else {
            (a[0], a[1])
        };
        let ob = if self.transpose_b {
            (b[1], b[0])
        } else {
            (b[0], b[1])
        };
        (oa, ob)
    }

    fn params(&self, a: &[usize], b: &[usize]) -> GemmParams {
        let ((m, k), (_, n)) = self.dims(a, b);
        let (a_row_stride, a_col_stride) = if self.transpose_a { (1, m) } else { (k, 1) };
        let (b_row_stride, b_col_stride) = if self.transpose_b { (1, k) } else { (n, 1) };
        GemmParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            a_row_stride: a_row_stride as u32,
            a_col_stride: a_col_stride as u32,
            b_row_stride: b_row_stride as u32,
            b_col_stride: b_col_stride as u32,
            _pad: 0,
        }
    }

    fn record(
        &self,
        ctx: &mut PlanContext,
        a: TensorId,
        b: TensorId,
        (bias, activation): (Option<TensorId>, Option<Activation>),
        c: TensorId,
    ) -> Result<()> {
        let p = self.params(&ctx.shape(a), &ctx.shape(b));
        if p.k as usize > MAX_LOOP_TRIPS {
            bail!(
                "{}: an inner dimension of {} is longer than the {MAX_LOOP_TRIPS} terms one kernel loop may sum",
                self.describe(),
                p.k
            );
        }
        if let GemmKernel::Blocked { workgroup, .. } = ctx.gpu.tuning.gemm {
            return Self::record_blocked(ctx, &p, workgroup, a, b, (bias, activation), c);
        }
        let invocations = (p.m as usize).div_ceil(TILE) * (p.n as usize).div_ceil(TILE);
        let (entry, storage) = match bias {
            Some(bias) => (
                "matmul_bias",
                ctx.bind(&[(1, a), (2, b), (3, bias), (4, c)]),
            ),
            None => ("matmul", ctx.bind(&[(1, a), (2, b), (4, c)])),
        };
        let constants = [activation_constant(activation)];
        ctx.dispatch_with((Shader::Gemm, entry, &constants), &p, &storage, invocations)
    }

    /// The product on CPU adapters: both operands packed k-major, then the
    /// register-tiled kernel (`shaders/gemm_blocked.wgsl`).
    fn record_blocked(
        ctx: &mut PlanContext,
        p: &GemmParams,
        workgroup: u32,
        a: TensorId,
        b: TensorId,
        (bias, activation): (Option<TensorId>, Option<Activation>),
        c: TensorId,
    ) -> Result<()> {
        let (m_padded, n_padded) = (blocked::padded_rows(p.m), blocked::padded_columns(p.n));
        let a_stored = ctx.binding(a);
        let (packed_a, a_quads) = blocked::k_major_operand(
            ctx,
            a_stored,
            PackParams::matrix(p.m, m_padded, p.k, p.a_row_stride, p.a_col_stride),
        )?;
        let b_stored = ctx.binding(b);
        let (packed_b, b_quads) = blocked::k_major_operand(
            ctx,
            b_stored,
            PackParams::matrix(p.n, n_padded, p.k, p.b_col_stride, p.b_row_stride),
        )?;
        let params = BlockedParams {
            m: p.m,
            n: p.n,
            k: p.k,
            a_quads,
            b_quads,
            ..BlockedParams::default()
        }
        .contiguous_output(p.n, [0, 0]);
        let mut storage = vec![(1, packed_a), (2, packed_b), (4, ctx.binding(c))];
        let entry = match bias {
            Some(bias) => {
                storage.push((3, ctx.binding(bias)));
                "matmul_bias"
            }
            None => "matmul",
        };
        blocked::dispatch(
            ctx,
            (entry, activation),
            workgroup,
            (&params, &[]),
            &storage,
        )
    }

    /// CPU reference.
    pub fn cpu(&self, a: &CpuTensor, b: &CpuTensor) -> CpuTensor {
        let p = self.params(&a.shape, &b.shape);
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let mut c = CpuTensor::zeros(&[m, n]);
        for i in 0..m {
            for j in 0..n {
                c.data[i * n + j] = (0..k)
                    .map(|kk| {
                        a.data[i * p.a_row_stride as usize + kk * p.a_col_stride as usize] as f64
                            * b.data[kk * p.b_row_stride as usize + j * p.b_col_stride as usize]
                                as f64
                    })
                    .sum::<f64>() as f32;
            }
        }
        c
    }
}

impl Op for MatMul {
    fn describe(&self) -> String {
        format!(
            "matmul{}{}",
            if self.transpose_a { " A^T" } else { "" },
            if self.transpose_b { " B^T" } else { "" }
        )
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let [a, b] = inputs else {
            bail!("matmul takes two matrices")
        };
        expect_rank(a, 2, "matmul A")?;
        expect_rank(b, 2, "matmul B")?;
        let ((m, k), (k2, n)) = self.dims(&a.shape, &b.shape);
        if k != k2 {
            bail!(
                "{}: inner dimensions differ ({:?} and {:?})",
                self.describe(),
                a.shape,
                b.shape
            );
        }
        Ok(vec![(vec![m, n], DType::F32)])
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        let ((_, k), _) = self.dims(&inputs[0].shape, &inputs[1].shape);
        2 * (outputs[0].shape.iter().product::<usize>() * k) as u64
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.record(ctx, inputs[0], inputs[1], (None, None), outputs[0])
    }
}

/// `nn.Linear`: inputs x `[batch, in]`, weight `[out, in]`, bias `[out]`.
#[derive(Clone, Copy, Debug)]
pub struct Linear;

const X_TIMES_W_T: MatMul = MatMul {
    transpose_a: false,
    transpose_b: true,
};

impl Linear {
    pub fn cpu_forward(x: &CpuTensor, weight: &CpuTensor, bias: &[f32]) -> CpuTensor {
        let mut y = X_TIMES_W_T.cpu(x, weight);
        let out = bias.len();
        for (i, v) in y.data.iter_mut().enumerate() {
            *v += bias[i % out];
        }
        y
    }

    /// `(dx, dweight, dbias)`: dy W, dy^T x, and dy summed over the batch.
    pub fn cpu_backward(
        x: &CpuTensor,
        weight: &CpuTensor,
        dy: &CpuTensor,
    ) -> (CpuTensor, CpuTensor, Vec<f32>) {
        let dx = MatMul {
            transpose_a: false,
            transpose_b: false,
        }
        .cpu(dy, weight);
        let dw = MatMul {
            transpose_a: true,
            transpose_b: false,
        }
        .cpu(dy, x);
        (dx, dw, ChannelSum::cpu(dy))
    }
}

impl Op for Linear {
    fn describe(&self) -> String {
        "linear".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        let [x, weight, bias] = inputs else {
            bail!("linear takes x, weight and bias")
        };
        expect_rank(x, 2, "linear input")?;
        expect_rank(weight, 2, "linear weight")?;
        if x.shape[1] != weight.shape[1] {
            bail!(
                "linear weight {:?} expects {} input features, the input {:?} has {}",
                weight.shape,
                weight.shape[1],
                x.shape,
                x.shape[1]
            );
        }
        if bias.shape != [weight.shape[0]] {
            bail!(
                "linear bias {:?} does not match {} outputs",
                bias.shape,
                weight.shape[0]
            );
        }
        Ok(vec![(vec![x.shape[0], weight.shape[0]], DType::F32)])
    }

    fn flops(&self, inputs: &[&Tensor], outputs: &[&Tensor]) -> u64 {
        2 * (outputs[0].shape.iter().product::<usize>() * inputs[1].shape[1]) as u64
    }

    fn plan(&self, ctx: &mut PlanContext, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()> {
        self.plan_activated(ctx, inputs, outputs, None)
    }

    fn with_activation(&self, activation: Activation) -> Option<Rc<dyn Op>> {
        Some(Rc::new(Activated::new(*self, activation)))
    }

    fn backward(
        &self,
        g: &mut Graph,
        inputs: &[TensorId],
        _outputs: &[TensorId],
        output_grads: &[Option<TensorId>],
        needs: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let dy = output_grads[0].expect("autodiff only asks for gradients it has");
        let (x, weight) = (inputs[0], inputs[1]);
        let dx = if needs[0] {
            let dy_w = MatMul {
                transpose_a: false,
                transpose_b: false,
            };
            Some(g.apply1(dy_w, &[dy, weight])?)
        } else {
            None
        };
        let dw = if needs[1] {
            let dy_t_x = MatMul {
                transpose_a: true,
                transpose_b: false,
            };
            Some(g.apply1(dy_t_x, &[dy, x])?)
        } else {
            None
        };
        let db = if needs[2] {
            Some(g.apply1(ChannelSum, &[dy])?)
        } else {
            None
        };
        Ok(vec![dx, dw, db])
    }
}

impl Epilogue for Linear {
    fn plan_activated(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        outputs: &[TensorId],
        activation: Option<Activation>,
    ) -> Result<()> {
        let (x, weight, bias) = (inputs[0], inputs[1], inputs[2]);
        X_TIMES_W_T.record(ctx, x, weight, (Some(bias), activation), outputs[0])
    }
}
