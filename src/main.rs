//! The command line: parses, calls into the library, prints.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use d2l_wgpu::data::FashionMnist;
use d2l_wgpu::data::CLASSES;
use d2l_wgpu::gpu::{self, AdapterRequest, BackendChoice, Gpu};
use d2l_wgpu::models::{self, ModelSpec};
use d2l_wgpu::ops::{MatMul, Optimizer};
use d2l_wgpu::train::predict::{self, ImageSource, PredictConfig};
use d2l_wgpu::train::progress::{Display, ProgressDisplay};
use d2l_wgpu::train::{self, bench, checkpoint, plot, EvalConfig, TrainConfig};
use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;

/// Train the CNNs of Dive into Deep Learning on Fashion-MNIST with WGSL compute shaders.
///
/// With no subcommand, trains: `d2l-wgpu --model lenet` is `d2l-wgpu train --model lenet`.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and print d2l's per-epoch line.
    Train(TrainArgs),
    /// Test loss, accuracy, per-class accuracy and confusion matrix of a checkpoint.
    Eval(EvalArgs),
    /// The most likely classes of image files (PNG/JPEG) or test-set images.
    Predict(PredictArgs),
    /// Per-layer output shapes and the parameter count, like d2l's layer_summary.
    Summary(SummaryArgs),
    /// Measure images/s of a training step and of inference.
    Bench(BenchArgs),
    /// List every GPU adapter wgpu can see, with the limits that matter here.
    Devices,
}

#[derive(Args)]
struct CheckpointArgs {
    /// Weights to load (safetensors, PyTorch state_dict keys).
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Model [default: the one the checkpoint names]: lenet, lenet-bn, alexnet, vgg, nin, googlenet, resnet, densenet.
    #[arg(long)]
    model: Option<String>,
    /// Input size [default: the checkpoint's, else the model's d2l resize].
    #[arg(long)]
    resize: Option<usize>,
    /// Folder with the Fashion-MNIST IDX .gz files [default: assets/fashion-mnist].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    gpu: GpuArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Mini-batch size [default: the model's d2l default].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Also draw the confusion matrix with class names to FILE.png or FILE.svg.
    #[arg(long, value_name = "FILE")]
    confusion: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Also classify test image N (0-based; repeatable).
    #[arg(long = "index", value_name = "N")]
    indices: Vec<usize>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// PNG or JPEG files, any size; colour is converted to grey.
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct SummaryArgs {
    /// Model: lenet, lenet-bn, alexnet, vgg, nin, googlenet, resnet, densenet.
    #[arg(long, default_value = "lenet")]
    model: String,
    /// Input size [default: the model's d2l resize].
    #[arg(long)]
    resize: Option<usize>,
}

#[derive(Args)]
struct BenchArgs {
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Also print the GPU time of every op in a training step (timestamp queries; each op's median over --steps profiled steps), and each op's rate as a share of SGEMM's, timed just before and after the op.
    #[arg(long)]
    profile: bool,
    /// Rows of the --profile table (ops with the same shapes share a row).
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Instead of a model, measure the project's matrix product (SGEMM) at 1024^3 and 2048^3.
    #[arg(long)]
    gemm: bool,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct GpuArgs {
    /// Graphics backend [env: WGPU_BACKEND].
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Use the first adapter whose name contains this text [env: WGPU_ADAPTER_NAME].
    #[arg(long)]
    adapter: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Model to train: lenet, lenet-bn, alexnet, vgg, nin, googlenet, resnet, densenet.
    #[arg(long, default_value = "lenet")]
    model: String,
    /// Epochs in all, counting those before a --resume [default: the model's d2l default, 10].
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate [default: the model's d2l default, LeNet 0.9].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Optimizer, with torch.optim's semantics (Adam: betas 0.9, 0.999, eps 1e-8).
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Sgd)]
    optimizer: OptimizerChoice,
    /// SGD momentum (0: plain SGD, d2l's default).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    momentum: f32,
    /// L2 weight decay added to every gradient, as torch.optim's weight_decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f32,
    /// Mini-batch size [default: the model's d2l default, LeNet 256].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Resize the 28x28 images to this size [default: the model's d2l default, LeNet 28].
    #[arg(long)]
    resize: Option<usize>,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder with the four Fashion-MNIST IDX .gz files [default: assets/fashion-mnist].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Train on the first N training images only.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Keep the training images in file order (d2l shuffles every epoch).
    #[arg(long)]
    no_shuffle: bool,
    /// Write a checkpoint here at every epoch end (plus PATH's .train-state.safetensors sidecar for --resume).
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Start from these weights (a checkpoint, or a PyTorch state_dict saved as safetensors).
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// Continue the run saved at PATH: weights, optimizer state, epoch and random streams.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Dropout probability for every dropout layer [default: the model's, 0.5 where d2l uses dropout]; 0 disables.
    #[arg(long)]
    dropout: Option<f32>,
    /// Write one row per epoch (epoch, losses, accuracies, examples/s, seconds) to FILE.csv or FILE.json.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Draw train loss, train acc and test acc against epoch (d2l's figure) to FILE.png or FILE.svg after every epoch.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Report the loss and accuracy of the last N batches every N batches [default: a bar on a terminal, else 10 lines per epoch].
    #[arg(long, value_name = "N")]
    log_every: Option<usize>,
    /// Print only the per-epoch lines: no progress bar or progress lines.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    gpu: GpuArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OptimizerChoice {
    Sgd,
    Adam,
}

fn adapter_request(args: &GpuArgs) -> AdapterRequest {
    AdapterRequest {
        backend: args.backend,
        name_contains: args.adapter.clone(),
    }
}

fn train_config(args: &TrainArgs) -> Result<TrainConfig> {
    let spec = models::find(&args.model)?;
    let lr = args.lr.unwrap_or(spec.lr);
    let optimizer = match args.optimizer {
        OptimizerChoice::Sgd => Optimizer::Sgd {
            lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
        OptimizerChoice::Adam => {
            if args.momentum != 0.0 {
                anyhow::bail!("--momentum is for --optimizer sgd; Adam uses betas (0.9, 0.999)");
            }
            Optimizer::adam(lr, args.weight_decay)
        }
    };
    Ok(TrainConfig {
        epochs: args.epochs.unwrap_or(spec.epochs),
        optimizer,
        batch_size: args.batch_size.unwrap_or(spec.batch_size),
        resize: args.resize.unwrap_or(spec.resize),
        seed: args.seed,
        data_dir: args
            .data_dir
            .clone()
            .unwrap_or_else(FashionMnist::default_dir),
        limit_train: args.limit_train,
        limit_test: args.limit_test,
        shuffle: !args.no_shuffle,
        reporting: Display::for_stdout(args.quiet).reporting(args.log_every.unwrap_or(0)),
        plot: args.plot.clone(),
        dropout: args.dropout,
        metrics: args.metrics.clone(),
        save: args.save.clone(),
        init: args.init.clone(),
        resume: args.resume.clone(),
        ..TrainConfig::new(spec)
    })
}

/// The model and input size for a checkpoint: flags first, then what the
/// checkpoint records, then the model's d2l default.
fn checkpoint_model(args: &CheckpointArgs) -> anyhow::Result<(&'static ModelSpec, usize)> {
    let saved = checkpoint::saved_settings(&args.checkpoint)?;
    let name = match (&args.model, &saved.model) {
        (Some(name), _) | (None, Some(name)) => name.clone(),
        (None, None) => anyhow::bail!(
            "{} does not say which model it holds; pass --model",
            args.checkpoint.display()
        ),
    };
    let spec = models::find(&name)?;
    let resize = args.resize.or(saved.resize).unwrap_or(spec.resize);
    Ok((spec, resize))
}

fn data_dir(dir: &Option<PathBuf>) -> PathBuf {
    dir.clone().unwrap_or_else(FashionMnist::default_dir)
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let cfg = train_config(args)?;
    cfg.validate()?;
    let gpu = Gpu::new(&adapter_request(&args.gpu))?;
    println!(
        "training {} for {} epochs: {}, batch size {}, resize {}, seed {}",
        cfg.model.name, cfg.epochs, cfg.optimizer, cfg.batch_size, cfg.resize, cfg.seed
    );
    if let Some(path) = &cfg.resume {
        if let Some(epoch) = checkpoint::saved_settings(path)?.epoch {
            println!("resuming {} after epoch {epoch}", path.display());
        }
    }
    let device = gpu.info.name.clone();
    let display = RefCell::new(ProgressDisplay::new(Display::for_stdout(args.quiet)));
    train::train(
        &gpu,
        &cfg,
        |p| display.borrow_mut().step(p),
        |report| display.borrow_mut().epoch_line(&report.line(&device)),
    )?;
    Ok(())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let gpu = Gpu::new(&adapter_request(&args.train.gpu))?;
    if args.gemm {
        println!(
            "SGEMM (the Linear layers' kernel, {:?}) on {}:",
            gpu.tuning.gemm, gpu.info.name
        );
        for product in [
            MatMul {
                transpose_a: true,
                transpose_b: false,
            },
            MatMul {
                transpose_a: false,
                transpose_b: false,
            },
        ] {
            for n in [1024, 2048] {
                let gflops = bench::gemm_gflops(&gpu, product, n, args.steps.clamp(3, 10))?;
                let stored = if product.transpose_a { "A^T B" } else { "A B" };
                println!("  {stored:<5} {n}x{n}x{n}: {gflops:.1} GFLOP/s");
            }
        }
        return Ok(());
    }
    let cfg = train_config(&args.train)?;
    let report = bench::bench(&gpu, &cfg, args.steps, args.profile)?;
    println!(
        "{} at {}x{}, batch {}, on {}",
        cfg.model.name, cfg.resize, cfg.resize, report.batch, gpu.info.name
    );
    let step_seconds = report.batch as f64 / report.train.images_per_sec;
    println!(
        "training step: {:.1} images/s, {:.1} GFLOP/s, CPU encode {:.3} ms",
        report.train.images_per_sec,
        report.train_flops as f64 / step_seconds / 1e9,
        report.train.encode_seconds * 1e3
    );
    println!(
        "inference:     {:.1} images/s, CPU encode {:.3} ms",
        report.eval.images_per_sec,
        report.eval.encode_seconds * 1e3
    );
    println!(
        "GPU memory:    {:.1} MiB in live buffers; training activations {:.1} MiB \
         ({:.0}% of the {:.1} MiB a buffer per tensor takes), scratch {:.1} MiB",
        report.gpu_bytes as f64 / MIB,
        report.activation_bytes as f64 / MIB,
        100.0 * report.activation_bytes as f64 / report.unshared_activation_bytes as f64,
        report.unshared_activation_bytes as f64 / MIB,
        report.scratch_bytes as f64 / MIB
    );
    if let Some(profile) = report.profile {
        let rows = &profile.ops;
        let total: f64 = rows.iter().map(|r| r.seconds).sum();
        let n = bench::PROBE_SIZE;
        println!("\nGPU time of one training step: {:.2} ms", total * 1e3);
        println!(
            "SGEMM meanwhile (A^T B {n}x{n}x{n}, timed before and after each op with FLOPs): \
             {:.1} GFLOP/s median, {:.1} to {:.1}",
            profile.gemm.median, profile.gemm.slowest, profile.gemm.fastest
        );
        println!(
            "{:>9}  {:>6}  {:>8}  {:>8}  op (count x)",
            "ms", "share", "GFLOP/s", "of SGEMM"
        );
        for row in rows.iter().take(args.top) {
            let (gflops, of_gemm) = if row.flops > 0 {
                let gflops = row.flops as f64 / row.seconds / 1e9;
                let share = 100.0 * row.sgemm_seconds / row.seconds;
                (format!("{gflops:.1}"), format!("{share:.0}%"))
            } else {
                (String::new(), String::new())
            };
            println!(
                "{:>9.3}  {:>5.1}%  {gflops:>8}  {of_gemm:>8}  {}x {}",
                row.seconds * 1e3,
                100.0 * row.seconds / total,
                row.count,
                row.label
            );
        }
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn run_eval(args: &EvalArgs) -> Result<()> {
    let (model, resize) = checkpoint_model(&args.checkpoint)?;
    let cfg = EvalConfig {
        model,
        resize,
        batch_size: args.batch_size.unwrap_or(model.batch_size),
        data_dir: data_dir(&args.checkpoint.data_dir),
        limit_test: args.limit_test,
        checkpoint: args.checkpoint.checkpoint.clone(),
    };
    if let Some(path) = &args.confusion {
        plot::check_path(path, "--confusion")?;
    }
    let gpu = Gpu::new(&adapter_request(&args.checkpoint.gpu))?;
    let report = train::evaluate_checkpoint(&gpu, &cfg)?;
    let total: u32 = report.confusion.iter().flatten().sum();
    println!(
        "{} at {resize}x{resize} on {} test images: loss {:.4}, accuracy {:.4}",
        model.name, total, report.loss, report.acc
    );
    println!("\nper-class accuracy:");
    for (class, row) in report.confusion.iter().enumerate() {
        let seen: u32 = row.iter().sum();
        let acc = f64::from(row[class]) / f64::from(seen.max(1));
        println!(
            "  {:<12} {acc:.4}  ({} of {seen})",
            CLASSES[class], row[class]
        );
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted):");
    print!("{:<12}", "");
    for c in 0..CLASSES.len() {
        print!("{c:>6}");
    }
    println!();
    for (class, row) in report.confusion.iter().enumerate() {
        print!("{class} {:<10}", CLASSES[class]);
        for count in row {
            print!("{count:>6}");
        }
        println!();
    }
    if let Some(path) = &args.confusion {
        let title = format!(
            "{} on {total} test images: accuracy {:.4}",
            model.name, report.acc
        );
        plot::confusion_matrix(path, &title, &report.confusion)?;
    }
    Ok(())
}

fn run_predict(args: &PredictArgs) -> Result<()> {
    let (model, resize) = checkpoint_model(&args.checkpoint)?;
    let cfg = PredictConfig {
        model,
        resize,
        data_dir: data_dir(&args.checkpoint.data_dir),
        checkpoint: args.checkpoint.checkpoint.clone(),
        top: args.top.clamp(1, CLASSES.len()),
    };
    let sources: Vec<ImageSource> = args
        .images
        .iter()
        .map(|p| ImageSource::File(p.clone()))
        .chain(args.indices.iter().map(|&i| ImageSource::TestIndex(i)))
        .collect();
    let gpu = Gpu::new(&adapter_request(&args.checkpoint.gpu))?;
    for p in predict::predict(&gpu, &cfg, &sources)? {
        match p.label {
            Some(label) => println!("{} (true class: {}):", p.source, CLASSES[label]),
            None => println!("{}:", p.source),
        }
        for (class, prob) in p.top {
            println!("  {:<12} {prob:.4}", CLASSES[class]);
        }
    }
    Ok(())
}

fn run_summary(args: &SummaryArgs) -> Result<()> {
    let spec = models::find(&args.model)?;
    let summary = models::summary(spec, args.resize.unwrap_or(spec.resize))?;
    for line in summary.lines() {
        println!("{line}");
    }
    println!("parameters: {}", summary.params);
    Ok(())
}

fn run_devices() {
    let adapters = gpu::list_adapters();
    if adapters.is_empty() {
        println!("no adapters found; on Linux without a GPU: apt-get install mesa-vulkan-drivers");
    }
    for a in adapters {
        let i = &a.info;
        println!("{} ({:?}, {:?})", i.name, i.backend, i.device_type);
        println!("  driver: {} {}", i.driver, i.driver_info);
        println!(
            "  max storage buffer binding: {} bytes",
            a.limits.max_storage_buffer_binding_size
        );
        println!("  max buffer size: {} bytes", a.limits.max_buffer_size);
        println!(
            "  max workgroups per dimension: {}",
            a.limits.max_compute_workgroups_per_dimension
        );
        println!(
            "  max invocations per workgroup: {}",
            a.limits.max_compute_invocations_per_workgroup
        );
        println!(
            "  min storage offset alignment: {}",
            a.limits.min_storage_buffer_offset_alignment
        );
        println!(
            "  timestamp queries in passes: {}",
            a.features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        );
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Train(args)) => run_train(args),
        Some(Command::Eval(args)) => run_eval(args),
        Some(Command::Predict(args)) => run_predict(args),
        Some(Command::Summary(args)) => run_summary(args),
        Some(Command::Bench(args)) => run_bench(args),
        Some(Command::Devices) => {
            run_devices();
            Ok(())
        }
        None => run_train(&cli.train),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
