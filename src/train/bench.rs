//! `d2l-wgpu bench`: images per second of a training step and of an
//! inference step, and optionally where the GPU time of a step goes.

use super::rng::Rng;
use super::{Session, TrainConfig};
use crate::gpu::Gpu;
use crate::graph::{Externals, Graph, Init, NodeTime, ParamStore, Plan};
use crate::ops::MatMul;
use anyhow::{ensure, Result};
use std::collections::HashMap;
use std::time::Instant;

pub struct BenchReport {
    pub batch: usize,
    pub train: StepTimes,
    pub eval: StepTimes,
    /// Floating-point operations of one training step (see `Op::flops`).
    pub train_flops: u64,
    /// Bytes of GPU memory in live buffers with both plans built: all a
    /// step needs, since plans allocate everything up front.
    pub gpu_bytes: u64,
    /// Bytes of activations the training plan allocated, and what a
    /// buffer per tensor would have taken.
    pub activation_bytes: u64,
    pub unshared_activation_bytes: u64,
    /// Bytes of the training plan's scratch buffers (packed operands,
    /// partial sums), shared by all its ops.
    pub scratch_bytes: u64,
    /// Where the GPU time of a training step goes.
    pub profile: Option<Profile>,
}

/// Per-op GPU time of one training step, largest first, and the matrix
/// product's rate meanwhile.
pub struct Profile {
    pub ops: Vec<OpProfile>,
    /// SGEMM's rate (`A^T B`, `PROBE_SIZE`^3), timed around each op with
    /// FLOPs in each profiled step (see `OpProfile::sgemm_seconds`).
    pub gemm: GemmRates,
}

/// GFLOP/s of the products timed during a profile.
pub struct GemmRates {
    pub median: f64,
    pub slowest: f64,
    pub fastest: f64,
}

/// The matrix size of the product that `Profile::gemm` times.
pub const PROBE_SIZE: usize = 1024;

/// Medians over the timed steps.
pub struct StepTimes {
    pub images_per_sec: f64,
    /// Seconds the CPU spends encoding and submitting one step.
    pub encode_seconds: f64,
}

/// The GPU time of every node with the same op and shapes in one step.
pub struct OpProfile {
    pub label: String,
    pub count: usize,
    pub seconds: f64,
    pub flops: u64,
    /// Seconds the same FLOPs would take at SGEMM's rate, each node's at
    /// the rate timed just before and after it: `sgemm_seconds / seconds`
    /// is the op's rate as a share of SGEMM's under the same load (a
    /// shared machine's speed swings by a third within seconds).
    pub sgemm_seconds: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median images per second and encode time of `steps` runs of `plan`
/// after a warm-up, each waited for before the next.
fn time_steps(
    gpu: &Gpu,
    plan: &Plan,
    indices: &wgpu::Buffer,
    batch: usize,
    steps: usize,
) -> Result<StepTimes> {
    let order: Vec<u32> = (0..batch as u32).collect();
    gpu.queue
        .write_buffer(indices, 0, bytemuck::cast_slice(&order));
    for _ in 0..2 {
        plan.run(gpu);
    }
    gpu.wait()?;
    let (mut step, mut encode) = (Vec::new(), Vec::new());
    for _ in 0..steps.max(1) {
        let start = Instant::now();
        plan.run(gpu);
        encode.push(start.elapsed().as_secs_f64());
        gpu.wait()?;
        step.push(start.elapsed().as_secs_f64());
    }
    Ok(StepTimes {
        images_per_sec: batch as f64 / median(step),
        encode_seconds: median(encode),
    })
}

/// Every node's median GPU time over `steps` profiled runs of `plan` (one
/// run's times swing by a third on a shared machine), beside the median
/// time of the matrix product timed around it in each run.
fn median_profile(gpu: &Gpu, plan: &Plan, steps: usize) -> Result<Profile> {
    let product = MatMul {
        transpose_a: true,
        transpose_b: false,
    };
    let probe = GemmProbe::new(gpu, product, PROBE_SIZE)?;
    let runs = (0..steps.max(1))
        .map(|_| plan.profile(gpu, &probe.plan))
        .collect::<Result<Vec<_>>>()?;
    let mut nodes = runs[0].clone();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.seconds = median(runs.iter().map(|run| run[i].seconds).collect());
        node.reference_seconds = (node.reference_seconds.is_some()).then(|| {
            median(
                runs.iter()
                    .filter_map(|run| run[i].reference_seconds)
                    .collect(),
            )
        });
    }
    let around: Vec<f64> = (runs.iter().flatten())
        .filter_map(|node| node.reference_seconds)
        .collect();
    ensure!(
        !around.is_empty(),
        "the training step has no op with FLOPs to compare with SGEMM"
    );
    let gemm = GemmRates {
        fastest: probe.gflops(around.iter().copied().fold(f64::INFINITY, f64::min)),
        slowest: probe.gflops(around.iter().copied().fold(0.0, f64::max)),
        median: probe.gflops(median(around)),
    };
    Ok(Profile {
        ops: by_op(nodes, probe.flops()),
        gemm,
    })
}

/// Sums the nodes with the same label, largest total first; each node
/// with a reference time compares with a product of `reference_flops`.
fn by_op(times: Vec<NodeTime>, reference_flops: f64) -> Vec<OpProfile> {
    let mut rows: Vec<OpProfile> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for t in times {
        let i = *index.entry(t.cost.label.clone()).or_insert_with(|| {
            rows.push(OpProfile {
                label: t.cost.label.clone(),
                count: 0,
                seconds: 0.0,
                flops: 0,
                sgemm_seconds: 0.0,
            });
            rows.len() - 1
        });
        rows[i].count += 1;
        rows[i].seconds += t.seconds;
        rows[i].flops += t.cost.flops;
        let per_flop = t.reference_seconds.unwrap_or(0.0) / reference_flops;
        rows[i].sgemm_seconds += t.cost.flops as f64 * per_flop;
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
}

pub fn bench(gpu: &Gpu, cfg: &TrainConfig, steps: usize, profile: bool) -> Result<BenchReport> {
    let session = Session::new(gpu, cfg)?;
    let (train, train_indices, batch) = session.train_plan();
    let train_times = time_steps(gpu, train, train_indices, batch, steps)?;
    let (eval, eval_indices, eval_batch) = session.eval_plan();
    let eval_times = time_steps(gpu, eval, eval_indices, eval_batch, steps)?;
    let profile = if profile {
        Some(median_profile(gpu, train, steps)?)
    } else {
        None
    };
    Ok(BenchReport {
        batch,
        train: train_times,
        eval: eval_times,
        train_flops: train.flops(),
        gpu_bytes: gpu.live_buffer_bytes(),
        activation_bytes: train.activation_bytes,
        unshared_activation_bytes: train.unshared_activation_bytes,
        scratch_bytes: train.scratch_bytes,
        profile,
    })
}

/// The project's matrix product, the kernel every Linear layer runs, on
/// `n` x `n` by `n` x `n`, planned once and run after a warm-up.
/// `product` says how A is stored: `A^T B` hands the blocked kernel both
/// operands in its k-major layout, `A B` adds the pass that repacks A.
struct GemmProbe {
    plan: Plan,
    _store: ParamStore,
    n: usize,
}

impl GemmProbe {
    fn new(gpu: &Gpu, product: MatMul, n: usize) -> Result<GemmProbe> {
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
        Ok(GemmProbe {
            plan,
            _store: store,
            n,
        })
    }

    /// Seconds of one product, submitted and waited for alone.
    fn seconds(&self, gpu: &Gpu) -> Result<f64> {
        let start = Instant::now();
        self.plan.run(gpu);
        gpu.wait()?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// Floating-point operations of one product (2 per multiply-add).
    fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }

    /// GFLOP/s of a product that took `seconds`.
    fn gflops(&self, seconds: f64) -> f64 {
        self.flops() / seconds / 1e9
    }
}

/// GFLOP/s of the project's matrix product (see `GemmProbe`) on `n` x `n`
/// by `n` x `n`: the median of `reps` timed products.
pub fn gemm_gflops(gpu: &Gpu, product: MatMul, n: usize, reps: usize) -> Result<f64> {
    let probe = GemmProbe::new(gpu, product, n)?;
    let seconds = (0..reps.max(1))
        .map(|_| probe.seconds(gpu))
        .collect::<Result<Vec<_>>>()?;
    Ok(probe.gflops(median(seconds)))
}

#[cfg(test)]
mod tests {
    use super::by_op;
    use crate::graph::{NodeCost, NodeTime};

    fn node(label: &str, flops: u64, seconds: f64, reference_seconds: Option<f64>) -> NodeTime {
        let label = label.to_string();
        NodeTime {
            cost: NodeCost { label, flops },
            seconds,
            reference_seconds,
        }
    }

    /// Nodes with the same label share a row; each node's FLOPs are priced
    /// at the SGEMM rate timed around that node, not an average rate.
    #[test]
    fn each_node_compares_with_the_sgemm_timed_around_it() {
        // A reference product of 100 FLOPs: 1 s before the first conv, 4 s
        // before the second (a slower spell).
        let rows = by_op(
            vec![
                node("conv", 50, 2.0, Some(1.0)),
                node("relu", 0, 0.5, None),
                node("conv", 20, 3.0, Some(4.0)),
            ],
            100.0,
        );
        let conv = rows.iter().find(|r| r.label == "conv").unwrap();
        assert_eq!((conv.count, conv.flops, conv.seconds), (2, 70, 5.0));
        // 50 FLOPs at 1 s per 100, 20 at 4 s per 100.
        assert!(
            (conv.sgemm_seconds - (0.5 + 0.8)).abs() < 1e-12,
            "{}",
            conv.sgemm_seconds
        );
        let relu = rows.iter().find(|r| r.label == "relu").unwrap();
        assert_eq!(relu.sgemm_seconds, 0.0);
        assert_eq!(rows[0].label, "conv", "largest total first");
    }
}
