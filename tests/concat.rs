//! Channel concatenation without copies: branches write into their slice
//! of the output, and later ops read slices in place (DenseNet's growing
//! input, Inception's parallel paths). A small graph using every op that
//! may meet a slice is checked, forward and backward, against the same
//! computation composed from the CPU references.

mod common;

use common::{assert_op_close, gpu, random};
use d2l_wgpu::graph::{autodiff, DType, Externals, Graph, Init, ParamStore, Plan, TensorId};
use d2l_wgpu::nn::ConvParameters;
use d2l_wgpu::ops::{Activation, AvgPool2d, BatchNorm, Conv2d, CpuTensor, MaxPool2d, PoolWindow};
use d2l_wgpu::train::rng::Rng;

/// `torch.cat(parts, dim=1)` on the CPU.
fn cat(parts: &[&CpuTensor]) -> CpuTensor {
    let n = parts[0].shape[0];
    let plane: usize = parts[0].shape[2..].iter().product();
    let channels: usize = parts.iter().map(|p| p.shape[1]).sum();
    let mut data = Vec::with_capacity(n * channels * plane);
    for i in 0..n {
        for p in parts {
            let per_sample = p.shape[1] * plane;
            data.extend_from_slice(&p.data[i * per_sample..(i + 1) * per_sample]);
        }
    }
    let mut shape = parts[0].shape.clone();
    shape[1] = channels;
    CpuTensor::new(&shape, data)
}

/// Channels `first..first + count` of `t`.
fn channels(t: &CpuTensor, first: usize, count: usize) -> CpuTensor {
    let plane: usize = t.shape[2..].iter().product();
    let per_sample = t.shape[1] * plane;
    let mut data = Vec::new();
    for i in 0..t.shape[0] {
        let start = i * per_sample + first * plane;
        data.extend_from_slice(&t.data[start..start + count * plane]);
    }
    let mut shape = t.shape.clone();
    shape[1] = count;
    CpuTensor::new(&shape, data)
}

fn add(a: &CpuTensor, b: &CpuTensor) -> CpuTensor {
    CpuTensor::new(
        &a.shape,
        a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect(),
    )
}

struct Weights {
    x: CpuTensor,
    w1: CpuTensor,
    b1: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    w2: CpuTensor,
    b2: Vec<f32>,
    w3: CpuTensor,
    b3: Vec<f32>,
    dy: CpuTensor,
}

const SAME_3X3: Conv2d = Conv2d {
    stride: (1, 1),
    padding: (1, 1),
};
const POINTWISE: Conv2d = Conv2d {
    stride: (1, 1),
    padding: (0, 0),
};

fn pools() -> (MaxPool2d, AvgPool2d) {
    let window = PoolWindow::new(3, 1).padding(1);
    (MaxPool2d(window), AvgPool2d(window))
}

/// The graph, written once for both sides:
///   p  = max_pool(x)                      (written into z1's first channels)
///   z1 = cat(p, conv3x3(relu(p)))         (DenseNet layer)
///   z2 = cat(z1, conv1x1(relu(bn(z1))))   (DenseNet layer reading a slice)
///   y  = cat(relu(conv1x1(z2)), avg_pool(z2))   (Inception-style paths)
/// Returns y and the gradients of x, w1, b1, gamma, beta, w2, b2, w3, b3.
fn cpu(w: &Weights) -> (CpuTensor, Vec<Vec<f32>>) {
    let relu = Activation::Relu;
    let (max_pool, avg_pool) = pools();
    let norm = BatchNorm::new(true);
    let (p, argmax) = max_pool.cpu_forward(&w.x);
    let rp = relu.cpu_forward(&p);
    let c1 = SAME_3X3.cpu_forward(&rp, &w.w1, &w.b1);
    let z1 = cat(&[&p, &c1]);
    let c = z1.shape[1];
    let bn = norm.cpu_train(&z1, &w.gamma, &w.beta, (&vec![0.0; c], &vec![1.0; c]));
    let r = relu.cpu_forward(&bn.y);
    let c2 = POINTWISE.cpu_forward(&r, &w.w2, &w.b2);
    let z2 = cat(&[&z1, &c2]);
    let q1 = relu.cpu_forward(&POINTWISE.cpu_forward(&z2, &w.w3, &w.b3));
    let q2 = avg_pool.cpu_forward(&z2);
    let y = cat(&[&q1, &q2]);

    let k = q1.shape[1];
    let dq1 = relu.cpu_backward(&q1, &channels(&w.dy, 0, k));
    let dq2 = channels(&w.dy, k, q2.shape[1]);
    let (dz2_a, dw3, db3) = POINTWISE.cpu_backward(&z2, &w.w3, &dq1);
    let dz2 = add(&dz2_a, &avg_pool.cpu_backward(&z2.shape, &dq2));
    let (dr, dw2, db2) = POINTWISE.cpu_backward(&r, &w.w2, &channels(&dz2, c, c2.shape[1]));
    let dbn = relu.cpu_backward(&r, &dr);
    let (dz1_b, dgamma, dbeta) = norm.cpu_backward(&z1, &w.gamma, &dbn);
    let dz1 = add(&channels(&dz2, 0, c), &dz1_b);
    let pc = p.shape[1];
    let (drp, dw1, db1) = SAME_3X3.cpu_backward(&rp, &w.w1, &channels(&dz1, pc, c1.shape[1]));
    let dp = add(&channels(&dz1, 0, pc), &relu.cpu_backward(&rp, &drp));
    let dx = max_pool.cpu_backward(&w.x.shape, &dp, &argmax);
    let grads = vec![
        dx.data, dw1.data, db1, dgamma, dbeta, dw2.data, db2, dw3.data, db3,
    ];
    (y, grads)
}

/// Runs the graph on the GPU, binding at most `binding_limit` bytes at once.
fn gpu_run(w: &Weights, binding_limit: u64) -> anyhow::Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let mut gpu = gpu();
    gpu.tuning.binding_limit = binding_limit;
    let mut g = Graph::new(true);
    let param = |g: &mut Graph, name: &str, shape: &[usize]| -> TensorId {
        g.param(name.into(), shape.to_vec(), Init::Zeros)
    };
    let x = param(&mut g, "x", &w.x.shape);
    let w1 = param(&mut g, "w1", &w.w1.shape);
    let b1 = param(&mut g, "b1", &[w.b1.len()]);
    let gamma = param(&mut g, "gamma", &[w.gamma.len()]);
    let beta = param(&mut g, "beta", &[w.beta.len()]);
    let w2 = param(&mut g, "w2", &w.w2.shape);
    let b2 = param(&mut g, "b2", &[w.b2.len()]);
    let w3 = param(&mut g, "w3", &w.w3.shape);
    let b3 = param(&mut g, "b3", &[w.b3.len()]);
    let c = w.gamma.len();
    let mean = g.state("mean".into(), vec![c], Init::Zeros);
    let var = g.state("var".into(), vec![c], Init::Ones);

    let relu = |g: &mut Graph, t| g.apply1(Activation::Relu, &[t]).unwrap();
    let (max_pool, avg_pool) = pools();
    let p = g.apply(max_pool, &[x]).unwrap()[0];
    let rp = relu(&mut g, p);
    let c1 = g.apply1(SAME_3X3, &[rp, w1, b1]).unwrap();
    let z1 = g.concat(&[p, c1]).unwrap();
    let bn = g
        .apply(BatchNorm::new(true), &[z1, gamma, beta, mean, var])
        .unwrap()[0];
    let r = relu(&mut g, bn);
    let c2 = g.apply1(POINTWISE, &[r, w2, b2]).unwrap();
    let z2 = g.concat(&[z1, c2]).unwrap();
    let q1 = g.apply1(POINTWISE, &[z2, w3, b3]).unwrap();
    let q1 = relu(&mut g, q1);
    let q2 = g.apply1(avg_pool, &[z2]).unwrap();
    let y = g.concat(&[q1, q2]).unwrap();
    let dy = g.input(w.dy.shape.clone(), DType::F32);
    autodiff::backward(&mut g, &[(y, dy)]).unwrap();

    let store = ParamStore::new(&gpu, &g).unwrap();
    let values = [
        &w.x.data, &w.w1.data, &w.b1, &w.gamma, &w.beta, &w.w2.data, &w.b2, &w.w3.data, &w.b3,
    ];
    for (i, v) in values.iter().enumerate() {
        store.write(&gpu, i, v).unwrap();
    }
    store.write_state(&gpu, 0, &vec![0.0; c]).unwrap();
    store.write_state(&gpu, 1, &vec![1.0; c]).unwrap();
    let plan = Plan::new(&gpu, &g, &store, &Externals::new())?;
    plan.write_f32(&gpu, &g, dy, &w.dy.data).unwrap();
    plan.run(&gpu);
    let grads = (0..values.len())
        .map(|i| store.read_grad(&gpu, i).unwrap())
        .collect();
    Ok((plan.read_f32(&gpu, &g, y).unwrap(), grads))
}

/// Random weights for the graph above at batch `n`, `ci` input channels.
fn weights(n: usize, ci: usize, h: usize, w: usize, rng: &mut Rng) -> Weights {
    let (g1, g2, k) = (2, 3, 5);
    let z2 = ci + g1 + g2;
    Weights {
        x: random(&[n, ci, h, w], rng),
        w1: random(&[g1, ci, 3, 3], rng),
        b1: random(&[g1], rng).data,
        gamma: random(&[ci + g1], rng).data,
        beta: random(&[ci + g1], rng).data,
        w2: random(&[g2, ci + g1, 1, 1], rng),
        b2: random(&[g2], rng).data,
        w3: random(&[k, z2, 1, 1], rng),
        b3: random(&[k], rng).data,
        dy: random(&[n, k + z2, h, w], rng),
    }
}

fn check(case: &str, w: &Weights, binding_limit: u64) {
    let names = [
        "dx", "dw1", "db1", "dgamma", "dbeta", "dw2", "db2", "dw3", "db3",
    ];
    let (want_y, want_grads) = cpu(w);
    let (got_y, got_grads) = gpu_run(w, binding_limit).unwrap();
    assert_op_close(&format!("{case} y"), &got_y, &want_y.data);
    for ((name, got), want) in names.iter().zip(&got_grads).zip(&want_grads) {
        assert_op_close(&format!("{case} {name}"), got, want);
    }
}

#[test]
fn concatenated_slices_match_cpu() {
    let mut rng = Rng::new(11);
    // Batch 1 (slices contiguous) and 3 (strided), odd planes, odd channels;
    // rows 14 wide take conv_rows for the 3x3 conv and its data gradient.
    for (n, ci, h, w) in [(1, 3, 5, 7), (3, 3, 7, 5), (2, 1, 4, 9), (3, 2, 4, 14)] {
        let weights = weights(n, ci, h, w, &mut rng);
        check(&format!("n {n} c {ci} {h}x{w}"), &weights, u64::MAX);
    }
}

/// Tensors larger than one binding are planned in batch chunks: per-sample
/// ops chunk by chunk, sums over the batch (conv filter and bias gradients,
/// batch-norm statistics) with each chunk's partial sums combined.
#[test]
fn batch_chunks_match_cpu() {
    let mut rng = Rng::new(12);
    // The output holds 1,540 bytes per sample: 4 KiB bindings take two
    // samples (chunks 0..1 and 1..3 of 3, starting off the 32-byte
    // alignment), 2 KiB ones a sample each.
    for (n, limit) in [(3, 4096), (5, 4096), (4, 2048)] {
        let weights = weights(n, 3, 7, 5, &mut rng);
        check(&format!("n {n} binding limit {limit}"), &weights, limit);
    }
    // 2,912 bytes per sample, 14-pixel rows (conv_rows): two samples per
    // 8 KiB binding.
    let weights = weights(3, 3, 4, 14, &mut rng);
    check("n 3 rows of 14, binding limit 8192", &weights, 8192);
}

#[test]
fn a_sample_larger_than_a_binding_is_refused() {
    let mut rng = Rng::new(13);
    let weights = weights(2, 3, 7, 5, &mut rng);
    let err = gpu_run(&weights, 1024).expect_err("1 KiB cannot hold a sample");
    let message = format!("{err:#}");
    assert!(
        message.contains(
            "one sample of [2, 8, 7, 5] needs 1120 bytes, more than the adapter's largest \
             storage binding (1024 bytes); try a smaller --resize"
        ),
        "{message}"
    );
}

#[test]
fn an_op_that_cannot_read_a_slice_is_refused() {
    let gpu = gpu();
    let mut g = Graph::new(true);
    let a = g.input(vec![2, 3, 4, 4], DType::F32);
    let a = g.apply1(Activation::Relu, &[a]).unwrap();
    let b = g.input(vec![2, 2, 4, 4], DType::F32);
    let b = g.apply1(Activation::Relu, &[b]).unwrap();
    g.concat(&[a, b]).unwrap();
    // Linear addresses its input as one contiguous matrix.
    let flat = g
        .apply1(d2l_wgpu::ops::Reshape::flatten(&[2, 2, 4, 4]), &[b])
        .unwrap();
    let weight = g.param("weight".into(), vec![3, 32], Init::Zeros);
    let bias = g.param("bias".into(), vec![3], Init::Zeros);
    g.apply1(d2l_wgpu::ops::Linear, &[flat, weight, bias])
        .unwrap();
    let store = ParamStore::new(&gpu, &g).unwrap();
    let err = Plan::new(&gpu, &g, &store, &Externals::new())
        .err()
        .expect("a slice fed to softmax is refused");
    assert!(
        format!("{err:#}")
            .contains("cannot read or write [2, 32], a channel slice of a concatenation"),
        "{err:#}"
    );
}

/// A 1x1 stride-2 convolution layer (ResNet's shortcut) reading a slice of
/// a concatenation: the pool that picks its even pixels
/// (`nn::ConvParameters::apply`) reads the slice's samples a whole
/// concatenation apart, not a slice apart.
#[test]
fn strided_pointwise_conv_reads_a_slice() {
    let gpu = gpu();
    let mut rng = Rng::new(14);
    let shortcut = Conv2d {
        stride: (2, 2),
        padding: (0, 0),
    };
    let (a, b) = (
        random(&[3, 5, 6, 8], &mut rng),
        random(&[3, 2, 6, 8], &mut rng),
    );
    let (w, bias) = (random(&[4, 5, 1, 1], &mut rng), random(&[4], &mut rng));
    let ra = Activation::Relu.cpu_forward(&a);
    let y = shortcut.cpu_forward(&ra, &w, &bias.data);
    let dy = random(&y.shape, &mut rng);
    let (_, dw, _) = shortcut.cpu_backward(&ra, &w, &dy);

    let mut g = Graph::new(false);
    let a_id = g.input(a.shape.clone(), DType::F32);
    let b_id = g.input(b.shape.clone(), DType::F32);
    let w_id = g.param("w".into(), w.shape.clone(), Init::Zeros);
    let bias_id = g.param("bias".into(), vec![4], Init::Zeros);
    let ra_id = g.apply1(Activation::Relu, &[a_id]).unwrap();
    let rb_id = g.apply1(Activation::Relu, &[b_id]).unwrap();
    g.concat(&[ra_id, rb_id]).unwrap();
    let layer = ConvParameters {
        op: shortcut,
        weight: w_id,
        bias: bias_id,
    };
    let y_id = layer.apply(&mut g, ra_id).unwrap();
    let dy_id = g.input(dy.shape.clone(), DType::F32);
    autodiff::backward(&mut g, &[(y_id, dy_id)]).unwrap();
    let store = ParamStore::new(&gpu, &g).unwrap();
    store.write(&gpu, 0, &w.data).unwrap();
    store.write(&gpu, 1, &bias.data).unwrap();
    let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(&gpu, &g, a_id, &a.data).unwrap();
    plan.write_f32(&gpu, &g, b_id, &b.data).unwrap();
    plan.write_f32(&gpu, &g, dy_id, &dy.data).unwrap();
    plan.run(&gpu);
    let got_y = plan.read_f32(&gpu, &g, y_id).unwrap();
    assert_op_close("y", &got_y, &y.data);
    assert_op_close("dw", &store.read_grad(&gpu, 0).unwrap(), &dw.data);
    let entries = plan.entry_points();
    assert!(entries.contains(&"avg_forward_even_pixels"), "{entries:?}");
}
