//! `d2l-wgpu bench`: images per second of a training step and of an
//! inference step, and optionally where the GPU time of a step goes.

use super::rng::Rng;
use super::{Session, TrainConfig};
use crate::gpu::Gpu;
use crate::graph::{Externals, Graph, Init, ParamStore, Plan};
use crate::ops::MatMul;
use anyhow::Result;
use std::collections::HashMap;
use std::time::Instant;

pub struct BenchReport {
    pub batch: usize,
    pub train_images_per_sec: f64,
    pub eval_images_per_sec: f64,
    /// Per-op GPU seconds of one training step, largest first.
    pub profile: Option<Vec<(String, f64)>>,
}

/// Images per second of `steps` back-to-back runs of `plan` after a warm-up.
fn time_steps(
    gpu: &Gpu,
    plan: &Plan,
    indices: &wgpu::Buffer,
    batch: usize,
    steps: usize,
) -> Result<f64> {
    let order: Vec<u32> = (0..batch as u32).collect();
    gpu.queue
        .write_buffer(indices, 0, bytemuck::cast_slice(&order));
    for _ in 0..2 {
        plan.run(gpu);
    }
    gpu.wait()?;
    let start = Instant::now();
    for _ in 0..steps {
        plan.run(gpu);
    }
    gpu.wait()?;
    Ok((steps * batch) as f64 / start.elapsed().as_secs_f64())
}

/// Sums the time of dispatches with the same label, largest first.
fn by_op(times: Vec<(String, f64)>) -> Vec<(String, f64)> {
    let mut totals: HashMap<String, f64> = HashMap::new();
    for (label, t) in times {
        *totals.entry(label).or_default() += t;
    }
    let mut rows: Vec<(String, f64)> = totals.into_iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

pub fn bench(gpu: &Gpu, cfg: &TrainConfig, steps: usize, profile: bool) -> Result<BenchReport> {
    let session = Session::new(gpu, cfg)?;
    let (train, train_indices, batch) = session.train_plan();
    let train_images_per_sec = time_steps(gpu, train, train_indices, batch, steps)?;
    let (eval, eval_indices, eval_batch) = session.eval_plan();
    let eval_images_per_sec = time_steps(gpu, eval, eval_indices, eval_batch, steps)?;
    let profile = if profile {
        Some(by_op(train.profile(gpu)?))
    } else {
        None
    };
    Ok(BenchReport {
        batch,
        train_images_per_sec,
        eval_images_per_sec,
        profile,
    })
}

/// GFLOP/s (2 per multiply-add) of the project's matrix product, the kernel
/// every Linear layer runs, on `n` x `n` by `n` x `n`: the median of `reps`
/// timed products after a warm-up, each submitted and waited for alone.
/// `product` says how A is stored: `A^T B` hands the blocked kernel both
/// operands in its k-major layout, `A B` adds the pass that repacks A.
pub fn gemm_gflops(gpu: &Gpu, product: MatMul, n: usize, reps: usize) -> Result<f64> {
    let mut g = Graph::new(false);
    let a = g.param("a".into(), vec![n, n], Init::Zeros);
    let b = g.param("b".into(), vec![n, n], Init::Zeros);
    g.apply1(product, &[a, b])?;
    let store = ParamStore::new(gpu, &g)?;
    let mut rng = Rng::new(0);
    for i in 0..2 {
        let values: Vec<f32> = (0..n * n).map(|_| rng.next_f32() - 0.5).collect();
        store.write(gpu, i, &values)?;
    }
    let plan = Plan::new(gpu, &g, &store, &Externals::new())?;
    plan.run(gpu);
    gpu.wait()?;
    let mut seconds = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        plan.run(gpu);
        gpu.wait()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    Ok(2.0 * (n as f64).powi(3) / median / 1e9)
}
