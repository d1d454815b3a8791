//! Properties of a planned training session.

mod common;

use d2l_wgpu::data::FashionMnist;
use d2l_wgpu::models;
use d2l_wgpu::train::{Session, TrainConfig};

/// After planning, training steps create no buffer, bind group or pipeline
/// and read nothing back (a readback needs a staging buffer): each step only
/// uploads its batch indices and submits recorded dispatches.
#[test]
fn training_steps_create_no_gpu_resources() {
    let gpu = common::gpu();
    let cfg = TrainConfig {
        model: models::find("lenet").unwrap(),
        epochs: 1,
        lr: 0.9,
        batch_size: 64,
        resize: 28,
        seed: 0,
        data_dir: FashionMnist::default_dir(),
        limit_train: Some(1000),
        limit_test: Some(100),
        log_every: 0,
        dropout: None,
        metrics: None,
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
