//! Whole models against one PyTorch training step (tests/golden/models):
//! the same initial weights (the README's integer formula, keyed by PyTorch
//! `state_dict` names), the same four images, then logits, loss and every
//! parameter gradient compared.

mod common;

use common::{
    assert_close, assert_model_close, check_gradients, cli_ok, golden_init, gpu, scratch_dir,
    Golden,
};
use d2l_wgpu::gpu::Gpu;
use d2l_wgpu::graph::{autodiff, DType, Externals, Graph, ParamStore, Plan};
use d2l_wgpu::models;
use d2l_wgpu::nn::Module;
use d2l_wgpu::ops::SoftmaxCrossEntropy;
use d2l_wgpu::train::checkpoint::{StoredTensor, TensorFile};

/// Writes the golden initial value of every parameter and state tensor,
/// checking that the model's names are exactly PyTorch's `state_dict` keys.
fn load_golden_init(gpu: &Gpu, gold: &Golden, store: &ParamStore) {
    let keys = gold.keys();
    let mut theirs: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("init."))
        .map(|k| {
            k.strip_suffix(".salt")
                .or(k.strip_suffix(".offset"))
                .or(k.strip_suffix(".scale"))
                .unwrap_or(k)
        })
        .collect();
    theirs.sort();
    theirs.dedup();
    let mut ours: Vec<&str> = store
        .specs()
        .iter()
        .chain(store.state_specs())
        .map(|s| s.name.as_str())
        .collect();
    ours.sort();
    assert_eq!(
        ours, theirs,
        "{}: names differ from PyTorch's state_dict keys",
        gold.name
    );
    for (i, spec) in store.specs().iter().enumerate() {
        let key = &spec.name;
        let len = spec.shape.iter().product();
        let salt = gold.i64(&format!("init.{key}.salt"))[0];
        let offset = gold.i64(&format!("init.{key}.offset"))[0];
        let scale = gold.f32(&format!("init.{key}.scale")).data[0];
        store
            .write(gpu, i, &golden_init(len, salt, offset, scale))
            .unwrap();
    }
    for (i, spec) in store.state_specs().iter().enumerate() {
        store
            .write_state(gpu, i, &gold.f32(&format!("init.{}", spec.name)).data)
            .unwrap();
    }
}

fn labels(gold: &Golden) -> Vec<u32> {
    gold.i64("labels").iter().map(|&l| l as u32).collect()
}

/// One training forward and backward from the golden input tensor.
fn check_forward_backward(gpu: &Gpu, model_name: &str) {
    let gold = Golden::load(&format!("models/{model_name}.safetensors"));
    let model = (models::find(model_name).unwrap().build)();
    let input = gold.f32("input");
    let labels = labels(&gold);

    let mut g = Graph::new(true);
    let x = g.input(input.shape.clone(), DType::F32);
    let y = g.input(vec![labels.len()], DType::U32);
    g.dropout_override = Some(0.0);
    let logits = model.forward(&mut g, x, "").unwrap();
    let loss = g
        .apply(SoftmaxCrossEntropy { with_grad: true }, &[logits, y])
        .unwrap();
    autodiff::backward(&mut g, &[(logits, loss[2])]).unwrap();

    let store = ParamStore::new(gpu, &g).unwrap();
    load_golden_init(gpu, &gold, &store);
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(gpu, &g, x, &input.data).unwrap();
    plan.write_u32(gpu, y, &labels);
    plan.run(gpu);

    let name = &gold.name;
    assert_model_close(
        &format!("{name} logits"),
        &plan.read_f32(gpu, &g, logits).unwrap(),
        &gold.f32("logits").data,
    );
    let losses = plan.read_f32(gpu, &g, loss[0]).unwrap();
    let mean = losses.iter().sum::<f32>() / losses.len() as f32;
    assert_close(
        &format!("{name} loss"),
        &[mean],
        &gold.f32("loss").data,
        1e-4,
        1e-3,
    );
    let grads: Vec<(String, Vec<f32>)> = store
        .specs()
        .iter()
        .enumerate()
        .map(|(i, spec)| (spec.name.clone(), store.read_grad(gpu, i).unwrap()))
        .collect();
    check_gradients(&gold, &grads);
}

/// Evaluation mode (running statistics, no dropout) with the initial weights.
fn check_eval_forward(gpu: &Gpu, model_name: &str) {
    let gold = Golden::load(&format!("models/{model_name}.safetensors"));
    let model = (models::find(model_name).unwrap().build)();
    let input = gold.f32("input");
    let mut g = Graph::new(false);
    let x = g.input(input.shape.clone(), DType::F32);
    let logits = model.forward(&mut g, x, "").unwrap();
    let store = ParamStore::new(gpu, &g).unwrap();
    load_golden_init(gpu, &gold, &store);
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(gpu, &g, x, &input.data).unwrap();
    plan.run(gpu);
    assert_model_close(
        &format!("{} eval_logits", gold.name),
        &plan.read_f32(gpu, &g, logits).unwrap(),
        &gold.f32("eval_logits").data,
    );
}

/// The golden initial weights as a checkpoint: every `state_dict` key of
/// the model, BatchNorm layers with `num_batches_tracked` 0.
fn golden_checkpoint(gold: &Golden, model_name: &str) -> TensorFile {
    let spec = models::find(model_name).unwrap();
    let mut g = Graph::new(false);
    let x = g.input(vec![1, 1, spec.resize, spec.resize], DType::F32);
    (spec.build)().forward(&mut g, x, "").unwrap();
    let mut file = TensorFile::default();
    for p in &g.params {
        let key = &p.name;
        let len = p.shape.iter().product();
        let salt = gold.i64(&format!("init.{key}.salt"))[0];
        let offset = gold.i64(&format!("init.{key}.offset"))[0];
        let scale = gold.f32(&format!("init.{key}.scale")).data[0];
        let values = golden_init(len, salt, offset, scale);
        file.tensors
            .insert(key.clone(), StoredTensor::f32(&p.shape, &values));
    }
    for s in &g.state {
        let values = gold.f32(&format!("init.{}", s.name)).data;
        file.tensors
            .insert(s.name.clone(), StoredTensor::f32(&s.shape, &values));
        if let Some(layer) = s.name.strip_suffix(".running_mean") {
            file.tensors.insert(
                format!("{layer}.num_batches_tracked"),
                StoredTensor::i64(&[], &[0]),
            );
        }
    }
    file
}

/// The trainer's real step through the command line: the golden initial
/// weights written as a checkpoint, then `train --init` on the first four
/// training images (the golden batch) with plain SGD. The saved checkpoint
/// must hold `init - lr * grad` for every parameter, the running statistics
/// after one step, `num_batches_tracked` 1, and the metrics file the loss.
fn check_training_step(model_name: &str) {
    let gold = Golden::load(&format!("models/{model_name}.safetensors"));
    let dir = scratch_dir(&format!("step-{model_name}"));
    let init = golden_checkpoint(&gold, model_name);
    let (init_path, out_path, metrics_path) = (
        dir.join("init.safetensors"),
        dir.join("out.safetensors"),
        dir.join("metrics.csv"),
    );
    init.write_atomic(&init_path).unwrap();
    let lr = 0.5f32;
    cli_ok(&[
        "train",
        "--model",
        model_name,
        "--init",
        init_path.to_str().unwrap(),
        "--limit-train",
        "4",
        "--batch-size",
        "4",
        "--limit-test",
        "4",
        "--no-shuffle",
        "--dropout",
        "0",
        "--epochs",
        "1",
        "--lr",
        &lr.to_string(),
        "--save",
        out_path.to_str().unwrap(),
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let out = TensorFile::read(&out_path).unwrap();
    let keys = |f: &TensorFile| f.tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&out), keys(&init), "{}: checkpoint keys", gold.name);

    let mut grads = Vec::new();
    for (key, before) in &init.tensors {
        let after = &out.tensors[key];
        assert_eq!(after.shape, before.shape, "{key}");
        if key.ends_with(".num_batches_tracked") {
            assert_eq!(after.to_i64(), Some(vec![1]), "{key}");
        } else if key.ends_with(".running_mean") || key.ends_with(".running_var") {
            assert_model_close(
                &format!("{} after.{key}", gold.name),
                &after.to_f32().unwrap(),
                &gold.f32(&format!("after.{key}")).data,
            );
        } else {
            // Recover the gradient the step applied: (before - after) / lr.
            let grad = before
                .to_f32()
                .unwrap()
                .iter()
                .zip(after.to_f32().unwrap())
                .map(|(b, a)| (b - a) / lr)
                .collect();
            grads.push((key.clone(), grad));
        }
    }
    check_gradients(&gold, &grads);

    let csv = std::fs::read_to_string(&metrics_path).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let train_loss: f32 = row[1].parse().unwrap();
    assert_close(
        &format!("{} metrics loss", gold.name),
        &[train_loss],
        &gold.f32("loss").data,
        1e-4,
        1e-3,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Eval forward, training forward and backward, and the trainer's step.
fn check_model(model_name: &str) {
    let gpu = gpu();
    check_eval_forward(&gpu, model_name);
    check_forward_backward(&gpu, model_name);
    check_training_step(model_name);
}

#[test]
fn lenet_matches_pytorch() {
    check_model("lenet");
}

#[test]
fn lenet_bn_matches_pytorch() {
    check_model("lenet-bn");
}

#[test]
fn alexnet_matches_pytorch() {
    check_model("alexnet");
}

#[test]
fn vgg_matches_pytorch() {
    check_model("vgg");
}

#[test]
fn nin_matches_pytorch() {
    check_model("nin");
}

#[test]
fn googlenet_matches_pytorch() {
    check_model("googlenet");
}

#[test]
fn resnet_matches_pytorch() {
    check_model("resnet");
}

#[test]
fn densenet_matches_pytorch() {
    check_model("densenet");
}
