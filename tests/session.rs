//! Properties of a planned training session.

mod common;

use d2l_wgpu::models;
use d2l_wgpu::train::{Reporting, Session, TrainConfig};

/// After planning, training steps create no buffer, bind group or pipeline
/// and read nothing back (a readback needs a staging buffer): each step only
/// uploads its batch indices and submits recorded dispatches.
fn small_config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 64,
        seed,
        limit_train: Some(640),
        limit_test: Some(128),
        ..TrainConfig::new(models::find("lenet-bn").unwrap())
    }
}

/// Two epochs, shuffled, with batch statistics: (loss, accuracy) per epoch
/// and every parameter and state value afterwards, as raw bits.
fn run(gpu: &d2l_wgpu::gpu::Gpu, seed: u64) -> (Vec<(u64, u64)>, Vec<u32>) {
    let cfg = small_config(seed);
    let session = Session::new(gpu, &cfg).unwrap();
    let mut order: Vec<u32> = (0..640).collect();
    let mut rng = d2l_wgpu::train::rng::Rng::new(seed);
    let mut metrics = Vec::new();
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        let (loss, acc) = session
            .train_epoch(gpu, 1, &order, Reporting::Off, |_| ())
            .unwrap();
        metrics.push((loss.to_bits(), acc.to_bits()));
    }
    let mut bits = Vec::new();
    for i in 0..session.params.specs().len() {
        bits.extend(
            session
                .params
                .read(gpu, i)
                .unwrap()
                .iter()
                .map(|v| v.to_bits()),
        );
    }
    for i in 0..session.params.state_specs().len() {
        bits.extend(
            session
                .params
                .read_state(gpu, i)
                .unwrap()
                .iter()
                .map(|v| v.to_bits()),
        );
    }
    (metrics, bits)
}

/// The same seed on the same adapter gives bit-identical metrics, weights
/// and running statistics (no float atomics anywhere); another seed differs.
#[test]
fn same_seed_same_bits() {
    let gpu = common::gpu();
    let first = run(&gpu, 5);
    assert_eq!(first, run(&gpu, 5));
    assert_ne!(first.1, run(&gpu, 6).1);
}

#[test]
fn training_steps_create_no_gpu_resources() {
    let gpu = common::gpu();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 64,
        limit_train: Some(1000),
        limit_test: Some(100),
        ..TrainConfig::new(models::find("lenet").unwrap())
    };
    let session = Session::new(&gpu, &cfg).unwrap();
    let order: Vec<u32> = (0..1000).collect();
    let before = gpu.resources_created();
    session.queue_training_steps(&gpu, &order).unwrap();
    gpu.wait().unwrap();
    assert_eq!(
        gpu.resources_created(),
        before,
        "16 training steps created GPU resources"
    );
    // The counter does count: a readback creates its staging buffer.
    session.evaluate(&gpu).unwrap();
    assert!(gpu.resources_created() > before);
}

/// Epochs allocate nothing that stays: the bytes held by live GPU buffers
/// are the same after every epoch (training, evaluation and their
/// readbacks). Host memory is measured on whole runs instead: the tests of
/// this binary share one process.
#[test]
fn live_gpu_memory_stays_flat_across_epochs() {
    let gpu = common::gpu();
    let cfg = small_config(1);
    let session = Session::new(&gpu, &cfg).unwrap();
    let order: Vec<u32> = (0..640).collect();
    let mut live = Vec::new();
    for epoch in 1..=4 {
        session
            .train_epoch(&gpu, epoch, &order, Reporting::EveryBatches(3), |_| ())
            .unwrap();
        session.evaluate(&gpu).unwrap();
        gpu.wait().unwrap();
        live.push(gpu.live_buffer_bytes());
    }
    assert!(live[0] > 0, "the allocator reports no buffers");
    assert!(live.iter().all(|&b| b == live[0]), "{live:?}");
}

/// A model's planned session at batch 4 on 8 images: for properties of the
/// plan itself.
fn batch_of_four(model: &str) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        limit_train: Some(8),
        limit_test: Some(8),
        ..TrainConfig::new(models::find(model).unwrap())
    }
}

/// A LeNet training step counts the FLOPs PyTorch's FlopCounterMode counts
/// for `loss.backward()` on d2l's LeNet: 2 per multiply-add of every conv
/// and Linear forward, of their weight gradients, and of every input
/// gradient but the first conv's (the images need none). Per image:
/// conv1 6*28*28 * 1*5*5, conv2 16*10*10 * 6*5*5, Linears 400*120 + 120*84
/// + 84*10 multiply-adds.
#[test]
fn a_training_step_counts_pytorchs_flops() {
    let gpu = common::gpu();
    let session = Session::new(&gpu, &batch_of_four("lenet")).unwrap();
    let (conv1, conv2, linears) = (
        6 * 28 * 28 * 25,
        16 * 10 * 10 * 150,
        400 * 120 + 120 * 84 + 84 * 10,
    );
    let per_image = 2 * (3 * (conv1 + conv2 + linears) - conv1);
    assert_eq!(session.train_plan().0.flops(), 4 * per_image);
}

/// Activations whose lifetimes do not overlap share buffers: ResNet-18's
/// training step at 96 px needs at most 60% of a buffer per tensor (the
/// ratio does not depend on the batch size; the golden model tests check
/// the shared buffers give PyTorch's numbers).
#[test]
fn resnet_activations_share_buffers() {
    let gpu = common::gpu();
    let session = Session::new(&gpu, &batch_of_four("resnet")).unwrap();
    let plan = session.train_plan().0;
    let share = plan.activation_bytes as f64 / plan.unshared_activation_bytes as f64;
    println!(
        "{} of {} bytes: {:.1}%",
        plan.activation_bytes,
        plan.unshared_activation_bytes,
        100.0 * share
    );
    assert!(share <= 0.6, "{share}");
}
