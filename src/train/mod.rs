//! The training loop of d2l's `train_ch6`: SGD on mini-batches, per-epoch
//! training loss and accuracy, then test accuracy in evaluation mode.

mod atomic;
pub mod bench;
pub mod checkpoint;
pub mod init;
mod metrics_file;
mod optimizer;
pub mod plot;
pub mod predict;
pub mod progress;
pub mod rng;

pub use metrics_file::MetricsFile;
pub use optimizer::OptimizerState;

use crate::data::{Dataset, FashionMnist};
use crate::gpu::Gpu;
use crate::graph::{autodiff, Binding, DType, Externals, Graph, ParamStore, Plan, Storage};
use crate::models::{self, ModelSpec};
use crate::nn::{Module, DROPOUT_RNG};
use crate::ops::{
    AccumulateConfusion, AccumulateMetrics, AdvanceRng, GatherResize, Optimizer,
    SoftmaxCrossEntropy,
};
use anyhow::{bail, Context, Result};
use checkpoint::{StoredTensor, TensorFile};
use rng::Rng;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Number of steps the CPU may queue ahead of the GPU.
const STEPS_IN_FLIGHT: usize = 2;

/// Training steps between checks for a non-finite loss.
const DIVERGENCE_CHECK: usize = 50;

/// A dataset uploaded to the GPU once: u8 pixels (four per word) and u32 labels.
pub struct GpuDataset {
    pixels: wgpu::Buffer,
    labels: wgpu::Buffer,
    pub len: usize,
    pub height: usize,
    pub width: usize,
}

impl GpuDataset {
    pub fn upload(gpu: &Gpu, data: &Dataset) -> Result<GpuDataset> {
        let bytes = data.images.len() as u64;
        if bytes > gpu.max_binding() {
            bail!(
                "the dataset's {bytes} bytes of pixels exceed the adapter's largest storage binding ({} bytes)",
                gpu.max_binding()
            );
        }
        let pixels = gpu.storage_buffer("dataset pixels", bytes)?;
        let mut padded = data.images.clone();
        padded.resize(bytes.next_multiple_of(4) as usize, 0);
        gpu.queue.write_buffer(&pixels, 0, &padded);
        let labels = gpu.storage_buffer("dataset labels", 4 * data.len() as u64)?;
        let wide: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
        gpu.queue
            .write_buffer(&labels, 0, bytemuck::cast_slice(&wide));
        Ok(GpuDataset {
            pixels,
            labels,
            len: data.len(),
            height: data.height,
            width: data.width,
        })
    }

    /// Binds the `pixels` and `labels` tensors of a step graph to this dataset.
    pub fn bind(&self, externals: &mut Externals) {
        externals.insert("pixels", Binding::whole(&self.pixels));
        externals.insert("labels", Binding::whole(&self.labels));
    }
}

/// What a step graph does after the forward pass.
#[derive(Clone, Copy, Debug)]
pub enum StepKind {
    /// Loss, backward pass and an optimizer update of `param_floats` flat parameters.
    Train {
        optimizer: Optimizer,
        param_floats: usize,
    },
    /// Loss, accuracy and the confusion matrix, in evaluation mode.
    Eval,
}

/// Classes of Fashion-MNIST (and rows of the confusion matrix).
const CLASSES: usize = crate::data::CLASSES.len();

/// Bytes of the u32 confusion matrix.
const CONFUSION_BYTES: u64 = (4 * CLASSES * CLASSES) as u64;

/// The graph of one step on a batch: gather and resize the batch on the GPU,
/// run the model, add loss and accuracy to the metrics, and when training
/// backpropagate and update the parameters.
pub fn step_graph(
    model: &dyn Module,
    data: &GpuDataset,
    batch: usize,
    resize: usize,
    dropout: Option<f32>,
    kind: StepKind,
) -> Result<Graph> {
    let mut g = Graph::new(matches!(kind, StepKind::Train { .. }));
    g.dropout_override = dropout;
    // Only the metrics, the confusion matrix and the parameters are read.
    g.reuse_activations = true;
    let pixels = g.external("pixels", vec![data.len, data.height, data.width], DType::U8);
    let all_labels = g.external("labels", vec![data.len], DType::U32);
    let indices = g.external("indices", vec![batch], DType::U32);
    let batch_data = g.apply(
        GatherResize { size: resize },
        &[pixels, all_labels, indices],
    )?;
    let (x, labels) = (batch_data[0], batch_data[1]);
    let logits = model.forward(&mut g, x, "")?;
    let with_grad = matches!(kind, StepKind::Train { .. });
    let loss = g.apply(SoftmaxCrossEntropy { with_grad }, &[logits, labels])?;
    let metrics = g.external("metrics", vec![4], DType::U32);
    g.apply_into(AccumulateMetrics, &[loss[0], loss[1]], &[metrics]);
    if let StepKind::Eval = kind {
        let confusion = g.external("confusion", vec![CLASSES * CLASSES], DType::U32);
        g.apply_into(AccumulateConfusion, &[logits, labels], &[confusion]);
    }
    if let StepKind::Train {
        optimizer,
        param_floats,
    } = kind
    {
        autodiff::backward(&mut g, &[(logits, loss[2])])?;
        let grads = g.external("gradients", vec![param_floats], DType::F32);
        let params = g.external("parameters", vec![param_floats], DType::F32);
        OptimizerState::add_step(optimizer, &mut g, grads, params);
        let uses_dropout = g
            .tensors
            .iter()
            .any(|t| t.storage == Storage::External(DROPOUT_RNG));
        if uses_dropout {
            let rng = g.external(DROPOUT_RNG, vec![2], DType::U32);
            g.apply_into(AdvanceRng, &[], &[rng]);
        }
    }
    Ok(g)
}

/// Running sums one set of steps adds to: `[loss_sum, correct, seen, 0]`,
/// and in evaluation the confusion matrix.
struct Metrics {
    buffer: wgpu::Buffer,
    confusion: Option<wgpu::Buffer>,
}

#[derive(Clone, Copy, Default)]
struct MetricSums {
    loss_sum: f64,
    correct: u32,
    seen: u32,
}

/// Training progress within an epoch, after every step. The figures come
/// only at report points (they need a read from the GPU).
pub struct Progress {
    pub epoch: usize,
    pub batches_done: usize,
    pub batches: usize,
    pub examples_done: usize,
    /// Since the epoch began: at report points, until this step finished
    /// on the GPU; otherwise until it was submitted.
    pub seconds: f64,
    pub figures: Option<ProgressFigures>,
}

/// Mean loss and accuracy over the batches since the last report, and over
/// the epoch so far.
#[derive(Clone, Copy, Debug)]
pub struct ProgressFigures {
    pub recent_loss: f64,
    pub recent_acc: f64,
    pub epoch_loss: f64,
    pub epoch_acc: f64,
}

/// When training reads its running loss and accuracy for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporting {
    /// Only the divergence checks read anything.
    Off,
    /// Every N batches (and at the epoch's end).
    EveryBatches(usize),
    /// About N times per epoch.
    PerEpoch(usize),
}

impl Reporting {
    fn every(self, batches: usize) -> usize {
        match self {
            Reporting::Off => 0,
            Reporting::EveryBatches(n) => n,
            Reporting::PerEpoch(n) => batches.div_ceil(n.max(1)),
        }
    }
}

impl Metrics {
    /// The sums for steps of `kind`; evaluation also counts a confusion matrix.
    fn new(gpu: &Gpu, label: &str, kind: StepKind) -> Result<Metrics> {
        let confusion = match kind {
            StepKind::Eval => Some(gpu.storage_buffer(label, CONFUSION_BYTES)?),
            StepKind::Train { .. } => None,
        };
        Ok(Metrics {
            buffer: gpu.storage_buffer(label, 16)?,
            confusion,
        })
    }

    fn reset(&self, gpu: &Gpu) {
        gpu.queue.write_buffer(&self.buffer, 0, &[0u8; 16]);
        if let Some(confusion) = &self.confusion {
            gpu.queue
                .write_buffer(confusion, 0, &[0u8; CONFUSION_BYTES as usize]);
        }
    }

    /// `[label][prediction]` counts; waits for the GPU.
    fn confusion(&self, gpu: &Gpu) -> Result<Vec<Vec<u32>>> {
        let confusion = self
            .confusion
            .as_ref()
            .context("training steps count no confusion matrix")?;
        let bytes = gpu.read_bytes(confusion, 0, CONFUSION_BYTES)?;
        let counts: &[u32] = bytemuck::cast_slice(&bytes);
        Ok(counts.chunks(CLASSES).map(<[u32]>::to_vec).collect())
    }

    /// The sums so far; waits for the GPU.
    fn sums(&self, gpu: &Gpu) -> Result<MetricSums> {
        let bytes = gpu.read_bytes(&self.buffer, 0, 16)?;
        let words: &[u32] = bytemuck::cast_slice(&bytes);
        Ok(MetricSums {
            loss_sum: f64::from(f32::from_bits(words[0])),
            correct: words[1],
            seen: words[2],
        })
    }

    /// (mean loss, accuracy); waits for the GPU.
    fn read(&self, gpu: &Gpu) -> Result<(f64, f64)> {
        let s = self.sums(gpu)?;
        let seen = f64::from(s.seen.max(1));
        Ok((s.loss_sum / seen, f64::from(s.correct) / seen))
    }
}

/// A planned step for one batch size, with the buffer its indices go to.
struct StepPlan {
    plan: Plan,
    indices: wgpu::Buffer,
}

/// Plans for full batches and, when the dataset does not divide evenly, for
/// the last smaller batch (d2l's DataLoader keeps it).
struct Steps {
    full: StepPlan,
    last: Option<StepPlan>,
    batch: usize,
}

impl Steps {
    fn new(
        gpu: &Gpu,
        cfg: &Setup<'_>,
        data: &GpuDataset,
        metrics: &Metrics,
        params: &ParamStore,
        kind: StepKind,
    ) -> Result<Steps> {
        let batch = cfg.batch_size.min(data.len);
        let plan_for = |size: usize| -> Result<StepPlan> {
            let graph = step_graph(cfg.model, data, size, cfg.resize, cfg.dropout, kind)?;
            let indices = gpu.storage_buffer("batch indices", 4 * size as u64)?;
            let mut externals = Externals::new();
            data.bind(&mut externals);
            externals.insert("indices", Binding::whole(&indices));
            externals.insert("metrics", Binding::whole(&metrics.buffer));
            if let Some(confusion) = &metrics.confusion {
                externals.insert("confusion", Binding::whole(confusion));
            }
            externals.insert("parameters", Binding::whole(&params.values));
            externals.insert("gradients", Binding::whole(&params.grads));
            externals.insert(DROPOUT_RNG, Binding::whole(cfg.dropout_rng));
            if let Some(state) = cfg.optimizer {
                state.bind(&mut externals);
            }
            Ok(StepPlan {
                plan: Plan::new(gpu, &graph, params, &externals)?,
                indices,
            })
        };
        let remainder = data.len % batch;
        Ok(Steps {
            full: plan_for(batch)?,
            last: if remainder > 0 {
                Some(plan_for(remainder)?)
            } else {
                None
            },
            batch,
        })
    }

    /// Runs one step per batch of `order`, keeping at most
    /// `STEPS_IN_FLIGHT` submissions queued, and calls `after_step` with the
    /// number of batches submitted so far (it decides whether to read anything).
    fn run_epoch(
        &self,
        gpu: &Gpu,
        order: &[u32],
        mut after_step: impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let mut in_flight = VecDeque::new();
        for (i, chunk) in order.chunks(self.batch).enumerate() {
            let step = if chunk.len() == self.batch {
                &self.full
            } else {
                self.last.as_ref().context("no plan for the last batch")?
            };
            gpu.queue
                .write_buffer(&step.indices, 0, bytemuck::cast_slice(chunk));
            in_flight.push_back(step.plan.run(gpu));
            if in_flight.len() > STEPS_IN_FLIGHT {
                gpu.check_errors()?;
                let oldest = in_flight.pop_front().expect("queue is not empty");
                gpu.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(oldest),
                        timeout: None,
                    })
                    .context("waiting for the GPU")?;
            }
            after_step(i + 1)?;
        }
        gpu.check_errors()
    }
}

/// Everything a training run needs to know.
pub struct TrainConfig {
    pub model: &'static ModelSpec,
    pub epochs: usize,
    pub optimizer: Optimizer,
    pub batch_size: usize,
    pub resize: usize,
    pub seed: u64,
    pub data_dir: PathBuf,
    /// Use only the first N training / test images.
    pub limit_train: Option<usize>,
    pub limit_test: Option<usize>,
    /// Shuffle the training images every epoch (d2l's DataLoader does).
    pub shuffle: bool,
    /// When to read the running loss and accuracy for `Progress` reports.
    pub reporting: Reporting,
    /// Replaces every dropout layer's probability (0 disables dropout).
    pub dropout: Option<f32>,
    /// Where to write one row per epoch (`.csv` or `.json`).
    pub metrics: Option<PathBuf>,
    /// Where to draw the training curves after every epoch (`.png` or `.svg`).
    pub plot: Option<PathBuf>,
    /// Checkpoint written at every epoch end.
    pub save: Option<PathBuf>,
    /// Start from these weights instead of d2l's initialisation.
    pub init: Option<PathBuf>,
    /// Continue the run saved here (weights, optimizer, epoch, random streams).
    pub resume: Option<PathBuf>,
}

impl TrainConfig {
    /// d2l's settings for `model`: its epochs, batch size, resize and SGD learning rate.
    pub fn new(model: &'static ModelSpec) -> TrainConfig {
        TrainConfig {
            model,
            epochs: model.epochs,
            optimizer: Optimizer::sgd(model.lr),
            batch_size: model.batch_size,
            resize: model.resize,
            seed: 0,
            data_dir: FashionMnist::default_dir(),
            limit_train: None,
            limit_test: None,
            shuffle: true,
            reporting: Reporting::Off,
            dropout: None,
            metrics: None,
            plot: None,
            save: None,
            init: None,
            resume: None,
        }
    }

    /// Checks the settings before any data is read or GPU work starts.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        validate_optimizer(&self.optimizer)?;
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                bail!("--dropout must be in [0, 1), got {p}");
            }
        }
        for (flag, limit) in [
            ("--limit-train", self.limit_train),
            ("--limit-test", self.limit_test),
        ] {
            if limit == Some(0) {
                bail!("{flag} must be at least 1");
            }
        }
        if let Some(path) = &self.metrics {
            MetricsFile::new(path)?;
        }
        if let Some(path) = &self.plot {
            plot::check_path(path, "--plot")?;
        }
        if self.init.is_some() && self.resume.is_some() {
            bail!("--init and --resume exclude each other: --resume already restores the weights");
        }
        for (flag, file) in [("--init", &self.init), ("--resume", &self.resume)] {
            if let Some(path) = file.as_deref().filter(|p| !p.is_file()) {
                bail!("{flag} {}: no such file", path.display());
            }
        }
        if let Some(path) = &self.save {
            let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(folder) = folder.filter(|f| !f.is_dir()) {
                bail!(
                    "--save {}: the folder {} does not exist",
                    path.display(),
                    folder.display()
                );
            }
        }
        models::check_resize(self.model, self.resize)
    }
}

fn validate_optimizer(optimizer: &Optimizer) -> Result<()> {
    let lr = optimizer.lr();
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive number, got {lr}");
    }
    let (weight_decay, unit_range) = match *optimizer {
        Optimizer::Sgd {
            momentum,
            weight_decay,
            ..
        } => (weight_decay, vec![("--momentum", momentum)]),
        Optimizer::Adam {
            betas,
            weight_decay,
            ..
        } => (weight_decay, vec![("beta1", betas.0), ("beta2", betas.1)]),
    };
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        bail!("--weight-decay must be 0 or more, got {weight_decay}");
    }
    for (name, value) in unit_range {
        if !(0.0..1.0).contains(&value) {
            bail!("{name} must be in [0, 1), got {value}");
        }
    }
    Ok(())
}

/// One epoch's figures, as d2l's `train_ch6` reports them.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Training examples per second (evaluation time excluded, as in d2l).
    pub examples_per_sec: f64,
    pub seconds: f64,
}

impl EpochReport {
    pub fn line(&self, device: &str) -> String {
        format!(
            "epoch {}, loss {:.3}, train acc {:.3}, test acc {:.3}, {:.1} examples/sec on {device}",
            self.epoch, self.train_loss, self.train_acc, self.test_acc, self.examples_per_sec
        )
    }

    /// Exact text form, for the training-state file.
    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.examples_per_sec,
            self.seconds
        )
    }

    fn decode(line: &str) -> Option<EpochReport> {
        let words: Vec<&str> = line.split(' ').collect();
        let [epoch, rest @ ..] = words.as_slice() else {
            return None;
        };
        let v: Vec<f64> = rest.iter().map(|w| w.parse().ok()).collect::<Option<_>>()?;
        let [train_loss, train_acc, test_loss, test_acc, examples_per_sec, seconds] = v[..] else {
            return None;
        };
        Some(EpochReport {
            epoch: epoch.parse().ok()?,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            examples_per_sec,
            seconds,
        })
    }
}

/// Where a resumed run continues from.
struct ResumePoint {
    epochs_done: usize,
    steps_done: u64,
    shuffle_state: u64,
    history: Vec<EpochReport>,
}

/// Test-set loss, accuracy and confusion matrix.
pub struct EvalReport {
    pub loss: f64,
    pub acc: f64,
    /// `confusion[label][prediction]`.
    pub confusion: Vec<Vec<u32>>,
}

/// Evaluation-mode steps over a dataset.
struct Evaluator {
    data: GpuDataset,
    steps: Steps,
    metrics: Metrics,
}

impl Evaluator {
    fn new(gpu: &Gpu, setup: &Setup<'_>, data: GpuDataset, params: &ParamStore) -> Result<Self> {
        let metrics = Metrics::new(gpu, "test metrics", StepKind::Eval)?;
        let steps = Steps::new(gpu, setup, &data, &metrics, params, StepKind::Eval)?;
        Ok(Evaluator {
            data,
            steps,
            metrics,
        })
    }

    fn run(&self, gpu: &Gpu) -> Result<EvalReport> {
        let order: Vec<u32> = (0..self.data.len as u32).collect();
        self.metrics.reset(gpu);
        self.steps.run_epoch(gpu, &order, |_| Ok(()))?;
        let (loss, acc) = self.metrics.read(gpu)?;
        Ok(EvalReport {
            loss,
            acc,
            confusion: self.metrics.confusion(gpu)?,
        })
    }
}

/// The parameter store a model needs (shapes from a one-image probe graph).
fn param_store(
    gpu: &Gpu,
    model: &dyn Module,
    data: &GpuDataset,
    resize: usize,
) -> Result<ParamStore> {
    let probe = step_graph(model, data, 1, resize, None, StepKind::Eval)?;
    ParamStore::new(gpu, &probe)
}

/// Reads a weights file and loads it, checking that it is for this model
/// where it says so.
fn load_weights(
    gpu: &Gpu,
    params: &ParamStore,
    path: &Path,
    model: &ModelSpec,
) -> Result<TensorFile> {
    let file = TensorFile::read(path)?;
    if let Some(saved) = file.meta("model") {
        if saved != model.name {
            bail!(
                "{} holds a {saved} checkpoint, not {}; pass --model {saved}",
                path.display(),
                model.name
            );
        }
    }
    checkpoint::load_state_dict(gpu, params, &file, path)?;
    Ok(file)
}

/// A model ready to train on the GPU: datasets uploaded, parameters
/// initialised (or loaded), training and evaluation steps planned.
pub struct Session {
    pub train_data: GpuDataset,
    pub params: ParamStore,
    optimizer: OptimizerState,
    train_steps: Steps,
    train_metrics: Metrics,
    evaluator: Evaluator,
    dropout_rng: wgpu::Buffer,
    resumed: Option<ResumePoint>,
}

impl Session {
    pub fn new(gpu: &Gpu, cfg: &TrainConfig) -> Result<Session> {
        cfg.validate()?;
        let mut data = FashionMnist::load(&cfg.data_dir)?;
        if let Some(n) = cfg.limit_train {
            data.train.truncate(n);
        }
        if let Some(n) = cfg.limit_test {
            data.test.truncate(n);
        }
        if cfg.batch_size > data.train.len() {
            bail!(
                "--batch-size {} is larger than the {} training images",
                cfg.batch_size,
                data.train.len()
            );
        }
        let train_data = GpuDataset::upload(gpu, &data.train)?;
        let test_data = GpuDataset::upload(gpu, &data.test)?;
        let model = (cfg.model.build)();
        let params = param_store(gpu, &model, &test_data, cfg.resize)?;
        let mut rng = Rng::new(cfg.seed);
        for (i, spec) in params.specs().iter().enumerate() {
            params.write(gpu, i, &init::initial_values(spec, &mut rng))?;
        }
        for (i, spec) in params.state_specs().iter().enumerate() {
            params.write_state(gpu, i, &init::initial_values(spec, &mut rng))?;
        }
        // Dropout's random stream [seed, step], advanced on the GPU after each training step.
        let dropout_rng = gpu.storage_buffer("dropout stream", 8)?;
        let seed = (cfg.seed ^ (cfg.seed >> 32)) as u32;
        gpu.queue
            .write_buffer(&dropout_rng, 0, bytemuck::cast_slice(&[seed, 0u32]));
        let optimizer = OptimizerState::new(gpu, cfg.optimizer, &params)?;
        if let Some(path) = &cfg.init {
            load_weights(gpu, &params, path, cfg.model)?;
        }
        let resumed = match &cfg.resume {
            Some(path) => Some(resume(gpu, cfg, path, &params, &optimizer, &dropout_rng)?),
            None => None,
        };
        let setup = Setup {
            model: &model,
            batch_size: cfg.batch_size,
            resize: cfg.resize,
            dropout: cfg.dropout,
            dropout_rng: &dropout_rng,
            optimizer: Some(&optimizer),
        };
        let train_kind = StepKind::Train {
            optimizer: cfg.optimizer,
            param_floats: (params.bytes / 4) as usize,
        };
        let train_metrics = Metrics::new(gpu, "train metrics", train_kind)?;
        let train_steps = Steps::new(
            gpu,
            &setup,
            &train_data,
            &train_metrics,
            &params,
            train_kind,
        )?;
        let evaluator = Evaluator::new(gpu, &setup, test_data, &params)?;
        Ok(Session {
            train_data,
            params,
            optimizer,
            train_steps,
            train_metrics,
            evaluator,
            dropout_rng,
            resumed,
        })
    }

    /// One pass over the training examples in `order`: (mean loss,
    /// accuracy). Every `DIVERGENCE_CHECK` batches (and at the end) the
    /// running sums are read and a non-finite loss stops the epoch.
    /// `progress` hears of every step; `reporting` decides at which steps it
    /// also gets the loss and accuracy. These are the only reads during the
    /// epoch.
    pub fn train_epoch(
        &self,
        gpu: &Gpu,
        epoch: usize,
        order: &[u32],
        reporting: Reporting,
        mut progress: impl FnMut(&Progress),
    ) -> Result<(f64, f64)> {
        self.train_metrics.reset(gpu);
        let batch = self.train_steps.batch;
        let batches = order.len().div_ceil(batch);
        let every = reporting.every(batches);
        let mut reported = MetricSums::default();
        let mut checked = MetricSums::default();
        let start = Instant::now();
        self.train_steps.run_epoch(gpu, order, |done| {
            let mut step = Progress {
                epoch,
                batches_done: done,
                batches,
                examples_done: (done * batch).min(order.len()),
                seconds: start.elapsed().as_secs_f64(),
                figures: None,
            };
            let report = every > 0 && (done % every == 0 || done == batches);
            if !report && done % DIVERGENCE_CHECK != 0 && done != batches {
                progress(&step);
                return Ok(());
            }
            let now = self.train_metrics.sums(gpu)?;
            if !now.loss_sum.is_finite() {
                let earlier = match checked.seen {
                    0 => "no earlier check".to_string(),
                    seen => format!(
                        "the last finite mean loss was {:.3}",
                        checked.loss_sum / f64::from(seen)
                    ),
                };
                bail!(
                    "the training loss became {} by step {done} of {batches} ({earlier})",
                    now.loss_sum
                );
            }
            checked = now;
            if report {
                let recent = f64::from((now.seen - reported.seen).max(1));
                let all = f64::from(now.seen.max(1));
                step.figures = Some(ProgressFigures {
                    recent_loss: (now.loss_sum - reported.loss_sum) / recent,
                    recent_acc: f64::from(now.correct - reported.correct) / recent,
                    epoch_loss: now.loss_sum / all,
                    epoch_acc: f64::from(now.correct) / all,
                });
                reported = now;
            }
            // The read above waited for the GPU: now the time is the work's.
            step.seconds = start.elapsed().as_secs_f64();
            progress(&step);
            Ok(())
        })?;
        self.train_metrics.read(gpu)
    }

    /// Queues one training step per batch of `order` and reads nothing
    /// back: each step uploads its batch indices and submits its recorded
    /// dispatches, creating no buffer, bind group or pipeline.
    pub fn queue_training_steps(&self, gpu: &Gpu, order: &[u32]) -> Result<()> {
        self.train_steps.run_epoch(gpu, order, |_| Ok(()))
    }

    /// Loss and accuracy on the whole test set, in evaluation mode.
    pub fn evaluate(&self, gpu: &Gpu) -> Result<(f64, f64)> {
        let report = self.evaluator.run(gpu)?;
        Ok((report.loss, report.acc))
    }

    /// Writes the weights to `path` and the training state to its sidecar
    /// (sidecar first: the weights file's epoch marks a complete pair).
    fn save(&self, gpu: &Gpu, cfg: &TrainConfig, path: &Path, point: &ResumePoint) -> Result<()> {
        let mut weights = checkpoint::state_dict(gpu, &self.params, point.steps_done)?;
        let mut state = TensorFile::default();
        self.optimizer.save(gpu, &self.params, &mut state)?;
        let rng = gpu.read_bytes(&self.dropout_rng, 0, 8)?;
        let words: &[u32] = bytemuck::cast_slice(&rng);
        state.tensors.insert(
            "dropout_stream".into(),
            StoredTensor::u64(&[u64::from(words[0]), u64::from(words[1])]),
        );
        state.tensors.insert(
            "shuffle_rng".into(),
            StoredTensor::u64(&[point.shuffle_state]),
        );
        let history: Vec<String> = point.history.iter().map(EpochReport::encode).collect();
        state.metadata.insert("history".into(), history.join("\n"));
        for file in [&mut weights, &mut state] {
            let meta = [
                ("model", cfg.model.name.to_string()),
                ("resize", cfg.resize.to_string()),
                ("epoch", point.epochs_done.to_string()),
                ("step", point.steps_done.to_string()),
                ("seed", cfg.seed.to_string()),
                ("optimizer", cfg.optimizer.to_string()),
            ];
            for (key, value) in meta {
                file.metadata.insert(key.into(), value);
            }
        }
        state.write_atomic(&checkpoint::sidecar_path(path))?;
        weights.write_atomic(path)
    }

    /// The planned full-batch training step (for benchmarks and profiles).
    pub fn train_plan(&self) -> (&Plan, &wgpu::Buffer, usize) {
        (
            &self.train_steps.full.plan,
            &self.train_steps.full.indices,
            self.train_steps.batch,
        )
    }

    /// The planned full-batch evaluation step.
    pub fn eval_plan(&self) -> (&Plan, &wgpu::Buffer, usize) {
        let steps = &self.evaluator.steps;
        (&steps.full.plan, &steps.full.indices, steps.batch)
    }
}

/// Restores weights, optimizer state and random streams from a checkpoint
/// and its sidecar, and says where the run stopped.
fn resume(
    gpu: &Gpu,
    cfg: &TrainConfig,
    path: &Path,
    params: &ParamStore,
    optimizer: &OptimizerState,
    dropout_rng: &wgpu::Buffer,
) -> Result<ResumePoint> {
    let weights = load_weights(gpu, params, path, cfg.model)?;
    let sidecar = checkpoint::sidecar_path(path);
    let state = TensorFile::read(&sidecar).with_context(|| {
        format!(
            "--resume needs the training state next to {}",
            path.display()
        )
    })?;
    let shown = sidecar.display().to_string();
    let number = |file: &TensorFile, key: &str, name: &str| -> Result<u64> {
        file.meta(key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name}: no `{key}` in its metadata"))
    };
    let epochs_done = number(&weights, "epoch", &path.display().to_string())?;
    if number(&state, "epoch", &shown)? != epochs_done {
        bail!(
            "{shown} is from another epoch than {} (an interrupted save?); resume from a matching pair",
            path.display()
        );
    }
    if epochs_done as usize >= cfg.epochs {
        bail!(
            "{} already finished epoch {epochs_done}; pass --epochs larger than that to train on",
            path.display()
        );
    }
    let saved_optimizer = state.meta("optimizer").unwrap_or("?");
    if saved_optimizer != cfg.optimizer.to_string() {
        log::warn!(
            "{} was trained with {saved_optimizer}; continuing with {}",
            path.display(),
            cfg.optimizer
        );
    }
    optimizer.load(gpu, params, &state, &shown)?;
    let stream = |key: &str, len: usize| -> Result<Vec<u64>> {
        state
            .tensors
            .get(key)
            .and_then(StoredTensor::to_u64)
            .filter(|v| v.len() == len)
            .with_context(|| format!("{shown}: no u64 [{len}] tensor {key}"))
    };
    let words: Vec<u32> = stream("dropout_stream", 2)?
        .iter()
        .map(|&w| w as u32)
        .collect();
    gpu.queue
        .write_buffer(dropout_rng, 0, bytemuck::cast_slice(&words));
    let history = state
        .meta("history")
        .unwrap_or_default()
        .lines()
        .map(|line| {
            EpochReport::decode(line).with_context(|| format!("{shown}: bad history line {line:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ResumePoint {
        epochs_done: epochs_done as usize,
        steps_done: number(&weights, "step", &path.display().to_string())?,
        shuffle_state: stream("shuffle_rng", 1)?[0],
        history,
    })
}

struct Setup<'a> {
    model: &'a dyn Module,
    batch_size: usize,
    resize: usize,
    dropout: Option<f32>,
    dropout_rng: &'a wgpu::Buffer,
    optimizer: Option<&'a OptimizerState>,
}

/// Trains `cfg.model` (from d2l's initialisation, `--init` weights or a
/// `--resume` checkpoint) and calls `on_epoch` after every epoch. Returns
/// the reports of all epochs, including those before a resume.
pub fn train(
    gpu: &Gpu,
    cfg: &TrainConfig,
    mut on_progress: impl FnMut(&Progress),
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Vec<EpochReport>> {
    let mut session = Session::new(gpu, cfg)?;
    let metrics_file = cfg.metrics.as_deref().map(MetricsFile::new).transpose()?;
    let mut point = session.resumed.take().unwrap_or(ResumePoint {
        epochs_done: 0,
        steps_done: 0,
        shuffle_state: cfg.seed ^ 0x5eed_5eed_5eed_5eed,
        history: Vec::new(),
    });
    let mut shuffle_rng = Rng::new(point.shuffle_state);
    for epoch in point.epochs_done + 1..=cfg.epochs {
        let start = Instant::now();
        let mut order: Vec<u32> = (0..session.train_data.len as u32).collect();
        if cfg.shuffle {
            shuffle_rng.shuffle(&mut order);
        }
        let (train_loss, train_acc) = session
            .train_epoch(gpu, epoch, &order, cfg.reporting, &mut on_progress)
            .with_context(|| {
                format!(
                    "epoch {epoch}: training diverged; try a lower --lr (now {})",
                    cfg.optimizer.lr()
                )
            })?;
        let train_seconds = start.elapsed().as_secs_f64();
        let (test_loss, test_acc) = session.evaluate(gpu)?;
        let report = EpochReport {
            epoch,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            examples_per_sec: order.len() as f64 / train_seconds,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_epoch(&report);
        log::info!(
            "after epoch {epoch}: {} bytes of GPU buffers live",
            gpu.live_buffer_bytes()
        );
        point.history.push(report);
        point.epochs_done = epoch;
        point.steps_done += order.len().div_ceil(cfg.batch_size) as u64;
        point.shuffle_state = shuffle_rng.state();
        if let Some(file) = &metrics_file {
            file.write(&point.history)?;
        }
        if let Some(path) = &cfg.plot {
            let title = format!(
                "{}: {}, batch {}, resize {}",
                cfg.model.name, cfg.optimizer, cfg.batch_size, cfg.resize
            );
            plot::training_curves(path, &title, &point.history, cfg.epochs)?;
        }
        if let Some(path) = &cfg.save {
            session.save(gpu, cfg, path, &point)?;
        }
    }
    Ok(point.history)
}

/// What `d2l-wgpu eval` needs.
pub struct EvalConfig {
    pub model: &'static ModelSpec,
    pub resize: usize,
    pub batch_size: usize,
    pub data_dir: PathBuf,
    pub limit_test: Option<usize>,
    pub checkpoint: PathBuf,
}

/// Loss, accuracy and confusion matrix of a checkpoint on the test set, in
/// evaluation mode.
pub fn evaluate_checkpoint(gpu: &Gpu, cfg: &EvalConfig) -> Result<EvalReport> {
    if cfg.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if cfg.limit_test == Some(0) {
        bail!("--limit-test must be at least 1");
    }
    models::check_resize(cfg.model, cfg.resize)?;
    let mut test = FashionMnist::load_test(&cfg.data_dir)?;
    if let Some(n) = cfg.limit_test {
        test.truncate(n);
    }
    let test_data = GpuDataset::upload(gpu, &test)?;
    let model = (cfg.model.build)();
    let params = param_store(gpu, &model, &test_data, cfg.resize)?;
    load_weights(gpu, &params, &cfg.checkpoint, cfg.model)?;
    let dropout_rng = gpu.storage_buffer("dropout stream", 8)?;
    let setup = Setup {
        model: &model,
        batch_size: cfg.batch_size,
        resize: cfg.resize,
        dropout: None,
        dropout_rng: &dropout_rng,
        optimizer: None,
    };
    Evaluator::new(gpu, &setup, test_data, &params)?.run(gpu)
}
