//! The command line: parses, calls into the library, prints.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use d2l_wgpu::data::FashionMnist;
use d2l_wgpu::gpu::{self, AdapterRequest, BackendChoice, Gpu};
use d2l_wgpu::models;
use d2l_wgpu::train::{self, bench, TrainConfig};
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
    /// Per-layer output shapes and the parameter count, like d2l's layer_summary.
    Summary(SummaryArgs),
    /// Measure images/s of a training step and of inference.
    Bench(BenchArgs),
    /// List every GPU adapter wgpu can see, with the limits that matter here.
    Devices,
}

#[derive(Args)]
struct SummaryArgs {
    /// Model: lenet, lenet-bn, resnet.
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
    /// Also print the GPU time of every op in a training step (timestamp queries).
    #[arg(long)]
    profile: bool,
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
    /// Model to train: lenet, lenet-bn, resnet.
    #[arg(long, default_value = "lenet")]
    model: String,
    /// Epochs [default: the model's d2l default, 10].
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate [default: the model's d2l default, LeNet 0.9].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
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
    /// Dropout probability for every dropout layer [default: the model's, 0.5 where d2l uses dropout]; 0 disables.
    #[arg(long)]
    dropout: Option<f32>,
    /// Write one row per epoch (epoch, losses, accuracies, examples/s, seconds) to FILE.csv or FILE.json.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Print the loss and accuracy of the last N batches every N batches (0: off).
    #[arg(long, default_value_t = 0)]
    log_every: usize,
    #[command(flatten)]
    gpu: GpuArgs,
}

fn adapter_request(args: &GpuArgs) -> AdapterRequest {
    AdapterRequest {
        backend: args.backend,
        name_contains: args.adapter.clone(),
    }
}

fn train_config(args: &TrainArgs) -> Result<TrainConfig> {
    let spec = models::find(&args.model)?;
    Ok(TrainConfig {
        model: spec,
        epochs: args.epochs.unwrap_or(spec.epochs),
        lr: args.lr.unwrap_or(spec.lr),
        batch_size: args.batch_size.unwrap_or(spec.batch_size),
        resize: args.resize.unwrap_or(spec.resize),
        seed: args.seed,
        data_dir: args
            .data_dir
            .clone()
            .unwrap_or_else(FashionMnist::default_dir),
        limit_train: args.limit_train,
        limit_test: args.limit_test,
        log_every: args.log_every,
        dropout: args.dropout,
        metrics: args.metrics.clone(),
    })
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let cfg = train_config(args)?;
    cfg.validate()?;
    let gpu = Gpu::new(&adapter_request(&args.gpu))?;
    println!(
        "training {} for {} epochs: lr {}, batch size {}, resize {}, seed {}",
        cfg.model.name, cfg.epochs, cfg.lr, cfg.batch_size, cfg.resize, cfg.seed
    );
    let device = gpu.info.name.clone();
    let progress = |p: &train::Progress| {
        println!(
            "  batch {}/{}, loss {:.3}, train acc {:.3}",
            p.batches_done, p.batches, p.loss, p.acc
        )
    };
    train::train(&gpu, &cfg, progress, |report| {
        println!("{}", report.line(&device))
    })?;
    Ok(())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let cfg = train_config(&args.train)?;
    let gpu = Gpu::new(&adapter_request(&args.train.gpu))?;
    let report = bench::bench(&gpu, &cfg, args.steps, args.profile)?;
    println!(
        "{} at {}x{}, batch {}, on {}",
        cfg.model.name, cfg.resize, cfg.resize, report.batch, gpu.info.name
    );
    println!("training step: {:.1} images/s", report.train_images_per_sec);
    println!("inference:     {:.1} images/s", report.eval_images_per_sec);
    if let Some(rows) = report.profile {
        let total: f64 = rows.iter().map(|r| r.1).sum();
        println!("\nGPU time of one training step: {:.2} ms", total * 1e3);
        println!("{:>9}  {:>6}  op", "ms", "share");
        for (label, t) in rows.iter().take(20) {
            println!("{:>9.3}  {:>5.1}%  {label}", t * 1e3, 100.0 * t / total);
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
