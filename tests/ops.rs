//! Every op, forward and backward, on the GPU against its CPU reference on
//! awkward shapes, and against the PyTorch goldens in tests/golden/ops.

mod common;

use common::{assert_close, assert_op_close, gpu, random, run_graph, run_op, Golden};
use d2l_wgpu::data::Dataset;
use d2l_wgpu::gpu::{GemmKernel, Gpu};
use d2l_wgpu::graph::{autodiff, DType, Externals, Graph, Init, Op, ParamStore, Plan, TensorId};
use d2l_wgpu::nn::ConvParameters;
use d2l_wgpu::ops::{
    dropout_keeps, Activation, AdvanceRng, AvgPool2d, BatchNorm, ChannelSum, Conv2d, CpuTensor,
    Dropout, GatherResize, Linear, MatMul, MaxPool2d, Optimizer, ParallelConv2d, PoolWindow,
    SoftmaxCrossEntropy,
};
use d2l_wgpu::train::rng::Rng;
use d2l_wgpu::train::{GpuDataset, OptimizerState};

fn golden_ops(prefix: &str) -> Vec<String> {
    let dir = common::golden_path("ops");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix))
        .map(|n| format!("ops/{n}"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no goldens named {prefix}*");
    names
}

/// Compares each `(key, values)` with the golden tensor of that name.
fn assert_golden(what: &str, gold: &Golden, results: &[(&str, &[f32])]) {
    for (key, got) in results {
        assert_op_close(&format!("{what} {key}"), got, &gold.f32(key).data);
    }
}

/// `y = F.conv2d(x, weight, bias, stride, padding)` and `y.backward(dy)`:
/// y, x.grad, weight.grad, bias.grad against PyTorch for every conv golden.
#[test]
fn conv2d_matches_pytorch() {
    let gpu = gpu();
    for name in golden_ops("conv_") {
        let gold = Golden::load(&name);
        let (s, p) = (gold.meta_usize("stride"), gold.meta_usize("padding"));
        let conv = Conv2d {
            stride: (s, s),
            padding: (p, p),
        };
        let (x, w, b, dy) = (
            gold.f32("x"),
            gold.f32("weight"),
            gold.f32("bias"),
            gold.f32("dy"),
        );
        let r = run_op(&gpu, conv, &[&x, &w, &b], &dy);
        let [dx, dw, db] = [&r.input_grads[0], &r.input_grads[1], &r.input_grads[2]];
        assert_golden(
            &name,
            &gold,
            &[("y", &r.output), ("dx", dx), ("dweight", dw), ("dbias", db)],
        );
        let y = conv.cpu_forward(&x, &w, &b.data);
        let (dx, dw, db) = conv.cpu_backward(&x, &w, &dy);
        let cpu = [
            ("y", &y.data[..]),
            ("dx", &dx.data),
            ("dweight", &dw.data),
            ("dbias", &db),
        ];
        assert_golden(&format!("{name} cpu"), &gold, &cpu);
    }
}

/// Batch 1, odd sizes, channel counts that do not fill a register tile or
/// need several (40 output channels: two 32-row tiles), non-square inputs
/// and kernels, stride > 1 with padding, a filter gradient summing 4,500
/// terms (the blocked kernel splits it in three), kernel rows whose taps
/// slide by 1 to 3 along x in the blocked filter gradient and one too wide
/// to slide (17 taps), 1x1 kernels on planes of whole vec4s (read four
/// pixels a load) and not, 1x1 kernels with stride 2 (three quarters of dx
/// zeroed, four floats a store where dx's samples are whole vec4s), a
/// stride-1 data gradient storing four floats at a time into 6 x 6 planes
/// (rows of 6); with every kernel family.
#[test]
fn conv2d_matches_cpu_on_awkward_shapes() {
    let mut gpu = gpu();
    let mut rng = Rng::new(7);
    // The filter gradient's lanes per column run (blocked::k_lanes): 8, 4,
    // 2 (192 1x1 taps; pointwise, 5) and 1 (256 taps; pointwise, 128, its
    // 4,500 terms in splits of 1,500: a panel of 8 k straddles two). 1x1
    // stride-2 data gradients store the untapped phases' zeros beside their
    // results where dy's rows are even ([2, 4, 8, 8]; [3, 5, 6, 4], whose
    // last four columns hold one pair) and leave them to a pass of zeros
    // where not (odd rows of dy: [2, 3, 6, 6]; dx not twice dy: 11 x 11);
    // a tile's four columns from two rows of dy (6 x 6), and several K
    // splits of the filter gradient (30 x 30 at batch 5).
    type Case = ([usize; 4], [usize; 4], (usize, usize), (usize, usize)); // x, weight, stride, padding
    let cases: [Case; 21] = [
        ([3, 6, 15, 24], [10, 6, 1, 1], (2, 2), (0, 0)),
        ([1, 1, 5, 5], [1, 1, 3, 3], (1, 1), (0, 0)),
        ([2, 5, 6, 6], [3, 5, 3, 3], (1, 1), (1, 1)),
        ([2, 192, 3, 3], [5, 192, 1, 1], (1, 1), (0, 0)),
        ([2, 256, 3, 2], [3, 256, 1, 1], (1, 1), (0, 0)),
        ([5, 128, 30, 30], [3, 128, 1, 1], (1, 1), (0, 0)),
        ([2, 4, 8, 8], [3, 4, 1, 1], (2, 2), (0, 0)),
        ([3, 5, 6, 4], [7, 5, 1, 1], (2, 2), (0, 0)),
        ([2, 3, 6, 6], [4, 3, 1, 1], (2, 2), (0, 0)),
        ([3, 20, 12, 12], [36, 20, 1, 1], (2, 2), (0, 0)),
        ([5, 16, 60, 60], [3, 16, 1, 1], (2, 2), (0, 0)),
        ([3, 5, 6, 6], [7, 5, 1, 1], (1, 1), (0, 0)),
        ([2, 3, 5, 5], [6, 3, 1, 1], (1, 1), (0, 0)),
        ([2, 2, 4, 21], [3, 2, 2, 17], (1, 2), (0, 1)),
        ([1, 3, 7, 9], [5, 3, 3, 3], (2, 2), (1, 1)),
        ([2, 5, 9, 17], [7, 5, 4, 4], (3, 3), (2, 2)),
        ([3, 2, 8, 6], [6, 2, 3, 2], (2, 1), (1, 0)),
        ([1, 6, 11, 11], [9, 6, 1, 1], (2, 2), (0, 0)),
        ([2, 4, 6, 5], [3, 4, 5, 5], (1, 1), (2, 2)),
        ([3, 5, 7, 6], [40, 5, 3, 3], (1, 1), (1, 1)),
        ([5, 3, 30, 30], [34, 3, 3, 3], (1, 1), (1, 1)),
    ];
    let kernels = gemm_kernels(&gpu);
    for ((xs, ws, stride, padding), kernel) in cases
        .into_iter()
        .flat_map(|c| kernels.iter().map(move |&k| (c, k)))
    {
        gpu.tuning.gemm = kernel;
        let conv = Conv2d { stride, padding };
        let case = format!("{kernel:?} conv x{xs:?} w{ws:?} stride {stride:?} padding {padding:?}");
        let entries = check_conv(&gpu, conv, (xs, ws), &mut rng, &case);
        let shortcut = (ws[2], ws[3], stride) == (1, 1, (2, 2));
        let stores_zeros = xs[2] % 2 == 0 && xs[3] % 4 == 0;
        let blocked = matches!(kernel, GemmKernel::Blocked { .. });
        assert_eq!(
            entries.iter().any(|e| e.starts_with("zeros")),
            blocked && shortcut && !stores_zeros,
            "{case}: a pass of zeros: {entries:?}"
        );
    }
}

/// The matrix-product kernel families to test: the strided and the blocked
/// kernels, and the adapter's own choice where that differs (lavapipe's:
/// blocked, sharing A's loads across subgroups, and walking these tests'
/// small matrices row tiles first, which the plain family never does).
fn gemm_kernels(gpu: &Gpu) -> Vec<GemmKernel> {
    let plain = GemmKernel::Blocked {
        workgroup: 8,
        subgroups: false,
        rows_first_bytes: 0,
    };
    let mut kernels = vec![GemmKernel::Strided, plain];
    if !kernels.contains(&gpu.tuning.gemm) {
        kernels.push(gpu.tuning.gemm);
    }
    kernels
}

/// Runs `conv` forward and backward on random x `[n, c, h, w]`, weight,
/// bias and dy, checks y and every gradient against the CPU reference, and
/// returns the shader entry points the plan dispatched.
fn check_conv(
    gpu: &Gpu,
    conv: Conv2d,
    (xs, ws): ([usize; 4], [usize; 4]),
    rng: &mut Rng,
    case: &str,
) -> Vec<&'static str> {
    let x = random(&xs, rng);
    let w = random(&ws, rng);
    let b = random(&[ws[0]], rng);
    let y = conv.cpu_forward(&x, &w, &b.data);
    let dy = random(&y.shape, rng);
    let (dx, dw, db) = conv.cpu_backward(&x, &w, &dy);
    let r = run_op(gpu, conv, &[&x, &w, &b], &dy);
    assert_op_close(&format!("{case} y"), &r.output, &y.data);
    assert_op_close(&format!("{case} dx"), &r.input_grads[0], &dx.data);
    assert_op_close(&format!("{case} dweight"), &r.input_grads[1], &dw.data);
    assert_op_close(&format!("{case} dbias"), &r.input_grads[2], &db);
    r.entry_points
}

/// Filter gradients of 1x1 convolutions on planes of whole vec4s, which the
/// blocked kernels take four pixels of a channel at a time
/// (`conv_filter_gradient_pointwise`): one and two lanes per column run,
/// splits that end half way through a panel of A (at the end of x, and
/// before more of x: 2 splits of 1,180 pixels), samples of one vec4,
/// channels past the last column run, several row tiles and K splits,
/// batch 1. (`conv2d_filter_gradient_in_uneven_batch_chunks` binds x in
/// batch chunks.)
#[test]
fn pointwise_filter_gradient_matches_cpu() {
    let mut gpu = gpu();
    let mut rng = Rng::new(31);
    let conv = Conv2d {
        stride: (1, 1),
        padding: (0, 0),
    };
    let cases: [([usize; 4], [usize; 4]); 6] = [
        ([3, 20, 6, 6], [40, 20, 1, 1]),
        ([3, 128, 2, 2], [5, 128, 1, 1]),
        ([118, 128, 4, 5], [5, 128, 1, 1]),
        ([2, 256, 4, 4], [33, 256, 1, 1]),
        ([9, 24, 16, 16], [7, 24, 1, 1]),
        ([1, 64, 4, 6], [16, 64, 1, 1]),
    ];
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for (xs, ws) in cases {
            let case = format!("{kernel:?} x{xs:?} w{ws:?}");
            let entries = check_conv(&gpu, conv, (xs, ws), &mut rng, &case);
            let pointwise = entries.contains(&"conv_filter_gradient_pointwise");
            assert_eq!(
                pointwise,
                matches!(kernel, GemmKernel::Blocked { .. }),
                "{case}: {entries:?}"
            );
        }
    }
    // dy bound a sample at a time (33.8 KB), where a k-major copy of it
    // (33 rows padded to 64: 65.5 KB) would not fit one binding: the
    // pointwise kernel reads dy as it is, so it still takes it.
    gpu.tuning.binding_limit = 40_000;
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        let case = format!("{kernel:?} x[2, 8, 16, 16] w[33, 8, 1, 1] under 40,000-byte bindings");
        let entries = check_conv(&gpu, conv, ([2, 8, 16, 16], [33, 8, 1, 1]), &mut rng, &case);
        assert_eq!(
            entries.contains(&"conv_filter_gradient_pointwise"),
            matches!(kernel, GemmKernel::Blocked { .. }),
            "{case}: {entries:?}"
        );
    }
}

/// Two convolutions, `conv(conv(x, wa), wb)`, whose activations bind in
/// uneven batch chunks under a 1.1 MB binding limit (the first conv's
/// output in chunks of 1 and 2 samples). The blocked filter gradient sums
/// each chunk in as many K splits as the longest chunk needs; a shorter
/// chunk must still write all of its splits (zeros past its terms), or the
/// final sum picks up what the shared scratch memory held: here the second
/// conv's partial sums, planned just before. The second conv is 3x3, then
/// 1x1 (whose filter gradient reads the chunks of x four pixels at a time),
/// then 1x1 with stride 2.
#[test]
fn conv2d_filter_gradient_in_uneven_batch_chunks() {
    let mut gpu = gpu();
    gpu.tuning.binding_limit = 1_100_000;
    let mut rng = Rng::new(13);
    let conv_a = Conv2d {
        stride: (1, 1),
        padding: (1, 1),
    };
    for (kernel_b, stride_b) in [(3, 1), (1, 1), (1, 2)] {
        let conv_b = Conv2d {
            stride: (stride_b, stride_b),
            padding: (kernel_b / 2, kernel_b / 2),
        };
        let x = random(&[3, 15, 64, 64], &mut rng);
        let (wa, ba) = (random(&[32, 15, 3, 3], &mut rng), random(&[32], &mut rng));
        let wb = random(&[64, 32, kernel_b, kernel_b], &mut rng);
        let bb = random(&[64], &mut rng);
        let a = conv_a.cpu_forward(&x, &wa, &ba.data);
        let y = conv_b.cpu_forward(&a, &wb, &bb.data);
        let dy = random(&y.shape, &mut rng);
        let (da, dwb, dbb) = conv_b.cpu_backward(&a, &wb, &dy);
        let (_, dwa, dba) = conv_a.cpu_backward(&x, &wa, &da);

        let mut g = Graph::new(true);
        let tensors = [&x, &wa, &ba, &wb, &bb];
        let ids: Vec<_> = (tensors.iter().enumerate())
            .map(|(i, t)| g.param(format!("p{i}"), t.shape.clone(), Init::Zeros))
            .collect();
        let a_id = g.apply1(conv_a, &[ids[0], ids[1], ids[2]]).unwrap();
        let y_id = g.apply1(conv_b, &[a_id, ids[3], ids[4]]).unwrap();
        let dy_id = g.input(dy.shape.clone(), DType::F32);
        autodiff::backward(&mut g, &[(y_id, dy_id)]).unwrap();
        let store = ParamStore::new(&gpu, &g).unwrap();
        for (i, t) in tensors.iter().enumerate() {
            store.write(&gpu, i, &t.data).unwrap();
        }
        let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
        plan.write_f32(&gpu, &g, dy_id, &dy.data).unwrap();
        plan.run(&gpu);
        for (i, name, want) in [
            (1, "dwa", &dwa.data),
            (2, "dba", &dba),
            (3, "dwb", &dwb.data),
            (4, "dbb", &dbb),
        ] {
            // Sums of 12,288 products of values up to ~30: f32 rounding
            // there grows with the gradient's largest value.
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let got = store.read_grad(&gpu, i).unwrap();
            assert_close(
                &format!("{kernel_b}x{kernel_b} stride {stride_b} {name}"),
                &got,
                want,
                1e-5 * scale,
                1e-3,
            );
        }
        let entries = plan.entry_points();
        assert_eq!(
            entries.contains(&"conv_filter_gradient_pointwise"),
            (kernel_b, stride_b) == (1, 1),
            "{entries:?}"
        );
    }
}

/// Stride-1 convolutions that the row kernels compute from zero-padded
/// input rows, 16 output pixels of a row per invocation: `conv_rows` for
/// forward passes and data gradients into at most 8 channels, where rows
/// fill their 16-pixel segments well;
/// `conv_rows_filter_gradient` for filter gradients with at most 8 output
/// channels and rows of whole vec4s, 32 segments a lane (the second case:
/// 540 segments, the last lane's run cut short, lanes past the end).
/// Kernels 2 to 5 wide, uneven padding, rows ending mid-segment,
/// batch 1 (LeNet's two layers). Each case checks
/// which kernels it took; every blocked kernel family runs them.
#[test]
fn conv_rows_match_cpu() {
    let mut gpu = gpu();
    let mut rng = Rng::new(8);
    // x, weight, padding, and whether the forward pass, the data gradient
    // and the filter gradient take the row kernels.
    type Case = ([usize; 4], [usize; 4], (usize, usize), [bool; 3]);
    let cases: [Case; 9] = [
        ([1, 1, 28, 28], [6, 1, 5, 5], (2, 2), [true, true, true]),
        ([5, 2, 36, 40], [4, 2, 3, 3], (1, 1), [true, true, true]),
        ([1, 6, 14, 14], [16, 6, 5, 5], (0, 0), [false, true, false]),
        ([3, 2, 13, 29], [5, 2, 3, 5], (1, 2), [true, true, false]),
        ([2, 3, 12, 13], [16, 3, 2, 2], (0, 0), [false, true, false]),
        ([2, 20, 6, 14], [7, 20, 3, 3], (1, 1), [true, false, false]),
        ([2, 4, 5, 24], [3, 4, 4, 4], (0, 3), [true, true, false]),
        ([3, 2, 9, 12], [5, 2, 3, 3], (1, 1), [true, true, true]),
        ([2, 3, 7, 24], [8, 3, 2, 5], (0, 2), [true, true, true]),
    ];
    let kernels = ["conv_rows_bias", "conv_rows", "conv_rows_filter_gradient"];
    let blocked: Vec<GemmKernel> = gemm_kernels(&gpu)
        .into_iter()
        .filter(|k| *k != GemmKernel::Strided)
        .collect();
    for (family, (xs, ws, padding, expected)) in blocked.iter().flat_map(|&f| cases.map(|c| (f, c)))
    {
        gpu.tuning.gemm = family;
        let conv = Conv2d {
            stride: (1, 1),
            padding,
        };
        let case = format!("{family:?} conv x{xs:?} w{ws:?} padding {padding:?}");
        let entries = check_conv(&gpu, conv, (xs, ws), &mut rng, &case);
        for (kernel, expected) in kernels.iter().zip(expected) {
            assert_eq!(
                entries.contains(kernel),
                expected,
                "{case}: {kernel} in {entries:?}"
            );
        }
    }
}

/// A convolution whose forward and backward-data dispatches need more than
/// 65,535 workgroups along x (folded into a 2-D grid), and whose filter
/// gradient sums 16 million terms. Sized from the adapter's workgroup; one
/// channel keeps every tensor under the largest storage binding. The kernel
/// is 3 x 1, which `conv_rows` (its grid is one row of the output per
/// workgroup row) leaves to the kernels under test.
#[test]
fn conv2d_beyond_one_grid_dimension() {
    let gpu = gpu();
    let mut rng = Rng::new(11);
    let conv = Conv2d {
        stride: (1, 1),
        padding: (1, 0),
    };
    // Each invocation covers 4 pixels: more than 65,535 workgroups needs
    // more than 65,535 * 4 * workgroup pixels.
    let pixels_needed = 65_535 * 4 * gpu.tuning.workgroup as usize;
    let batch = pixels_needed / (64 * 64) + 1;
    let x = random(&[batch, 1, 64, 64], &mut rng);
    let w = random(&[1, 1, 3, 1], &mut rng);
    let b = random(&[1], &mut rng);
    let y = conv.cpu_forward(&x, &w, &b.data);
    let dy = random(&y.shape, &mut rng);
    let (dx, dw, db) = conv.cpu_backward(&x, &w, &dy);
    let r = run_op(&gpu, conv, &[&x, &w, &b], &dy);
    assert_op_close("large conv y", &r.output, &y.data);
    assert_op_close("large conv dx", &r.input_grads[0], &dx.data);
    assert_op_close("large conv dweight", &r.input_grads[1], &dw.data);
    assert_op_close("large conv dbias", &r.input_grads[2], &db);
}

/// `ParallelConv2d`: `act(conv2d(x, w_j, b_j))` for each j, against the
/// CPU reference of each convolution on its own, x's gradient their sum.
/// Backward it must be one data gradient and one filter gradient over all
/// the weights, with no gradient sums; the filter gradient's rows go to
/// each weight, and each weight to its rows of the concatenated one, from
/// offsets that are and are not whole vec4s (also where the length is).
#[test]
fn parallel_conv2d_matches_separate_convolutions() {
    let mut gpu = gpu();
    let mut rng = Rng::new(29);
    type Case = ([usize; 4], &'static [usize], usize, usize, usize); // x, out channels, kernel, stride, padding
    let cases: [Case; 6] = [
        ([2, 6, 5, 7], &[3, 5, 1], 1, 1, 0),
        ([2, 2, 5, 7], &[1, 2, 2], 1, 1, 0),
        ([1, 8, 6, 6], &[4, 8, 4], 1, 1, 0),
        ([3, 3, 9, 8], &[2, 5], 3, 2, 1),
        ([2, 3, 10, 12], &[2, 3, 1], 3, 1, 1),
        ([2, 40, 6, 6], &[16, 24, 16], 1, 1, 0),
    ];
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for (i, (xs, channels, k, stride, pad)) in cases.into_iter().enumerate() {
            let activation = [Activation::Relu, Activation::Sigmoid][i % 2];
            let case = format!(
                "{kernel:?} {activation:?} x{xs:?} into {channels:?}, {k}x{k} stride {stride} padding {pad}"
            );
            let conv = Conv2d {
                stride: (stride, stride),
                padding: (pad, pad),
            };
            let mut inputs = vec![random(&xs, &mut rng)];
            for &c in channels {
                inputs.push(random(&[c, xs[1], k, k], &mut rng));
                inputs.push(random(&[c], &mut rng));
            }
            let op = ParallelConv2d { conv, activation };
            check_parallel_conv(&gpu, op, &inputs, &mut rng, &case);
        }
    }
}

fn check_parallel_conv(
    gpu: &Gpu,
    op: ParallelConv2d,
    inputs: &[CpuTensor],
    rng: &mut Rng,
    case: &str,
) {
    let (x, conv, activation) = (&inputs[0], op.conv, op.activation);
    let (mut ys, mut dys) = (Vec::new(), Vec::new());
    let mut want_grads = vec![vec![0.0; x.data.len()]];
    for pair in inputs[1..].chunks(2) {
        let y = activation.cpu_forward(&conv.cpu_forward(x, &pair[0], &pair[1].data));
        let dy = random(&y.shape, rng);
        let (dx, dw, db) = conv.cpu_backward(x, &pair[0], &activation.cpu_backward(&y, &dy));
        for (sum, v) in want_grads[0].iter_mut().zip(&dx.data) {
            *sum += v;
        }
        want_grads.extend([dw.data, db]);
        ys.push(y);
        dys.push(dy);
    }

    let mut g = Graph::new(true);
    let ids: Vec<_> = (inputs.iter().enumerate())
        .map(|(i, t)| g.param(format!("input{i}"), t.shape.clone(), Init::Zeros))
        .collect();
    let outputs = g.apply(op, &ids).unwrap();
    let seeds: Vec<_> = (outputs.iter().zip(&dys))
        .map(|(&y, dy)| (y, g.input(dy.shape.clone(), DType::F32)))
        .collect();
    let forward_nodes = g.nodes.len();
    autodiff::backward(&mut g, &seeds).unwrap();
    let backward: Vec<String> = (g.nodes[forward_nodes..].iter())
        .map(|n| n.op.describe())
        .collect();
    let count = |what: &str| backward.iter().filter(|d| d.ends_with(what)).count();
    assert_eq!(
        (
            count("backward data"),
            count("backward filter"),
            count("add")
        ),
        (1, 1, 0),
        "{case}: backward nodes {backward:?}"
    );
    let store = ParamStore::new(gpu, &g).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        store.write(gpu, i, &t.data).unwrap();
    }
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    for (&(_, dy_id), dy) in seeds.iter().zip(&dys) {
        plan.write_f32(gpu, &g, dy_id, &dy.data).unwrap();
    }
    plan.run(gpu);
    for (j, (&y, want)) in outputs.iter().zip(&ys).enumerate() {
        let got = plan.read_f32(gpu, &g, y).unwrap();
        assert_op_close(&format!("{case} y{j}"), &got, &want.data);
    }
    for (i, want) in want_grads.iter().enumerate() {
        let got = store.read_grad(gpu, i).unwrap();
        assert_op_close(&format!("{case} gradient of input {i}"), &got, want);
    }
}

/// Convolutions of different kernel sizes cannot share one backward.
#[test]
fn parallel_conv2d_refuses_different_kernels() {
    let mut g = Graph::new(true);
    let x = g.input(vec![1, 2, 5, 5], DType::F32);
    let mut param = |name: &str, shape: Vec<usize>| g.param(name.into(), shape, Init::Zeros);
    let inputs = [
        param("a.weight", vec![3, 2, 1, 1]),
        param("a.bias", vec![3]),
        param("b.weight", vec![4, 2, 3, 3]),
        param("b.bias", vec![4]),
    ];
    let conv = Conv2d {
        stride: (1, 1),
        padding: (1, 1),
    };
    let op = ParallelConv2d {
        conv,
        activation: Activation::Relu,
    };
    let err = g.apply(op, &[&[x][..], &inputs].concat()).unwrap_err();
    assert!(
        err.to_string()
            .contains("one kernel size, got [1, 1] and [3, 3]"),
        "{err}"
    );
}

/// `F.linear(x, weight, bias)` and its gradients against PyTorch.
#[test]
fn linear_matches_pytorch() {
    let gpu = gpu();
    for name in golden_ops("linear_") {
        let gold = Golden::load(&name);
        let (x, w, b, dy) = (
            gold.f32("x"),
            gold.f32("weight"),
            gold.f32("bias"),
            gold.f32("dy"),
        );
        let r = run_op(&gpu, Linear, &[&x, &w, &b], &dy);
        let [dx, dw, db] = [&r.input_grads[0], &r.input_grads[1], &r.input_grads[2]];
        assert_golden(
            &name,
            &gold,
            &[("y", &r.output), ("dx", dx), ("dweight", dw), ("dbias", db)],
        );
        let y = Linear::cpu_forward(&x, &w, &b.data);
        let (dx, dw, db) = Linear::cpu_backward(&x, &w, &dy);
        let cpu = [
            ("y", &y.data[..]),
            ("dx", &dx.data),
            ("dweight", &dw.data),
            ("dbias", &db),
        ];
        assert_golden(&format!("{name} cpu"), &gold, &cpu);
    }
}

/// Both matrix-product kernels, every transpose combination, against the CPU
/// on shapes that leave partial register tiles (the blocked kernel's 32 rows
/// and 16 columns), that span several workgroups both ways, that are
/// already in the blocked kernel's packed layout (A^T with 64 rows, B with
/// 48 columns: bound without a packing pass), that are k-major with whole
/// vec4s but short of a tile (A^T with 36 or 4 rows, B with 20 or 4
/// columns: bound as they are, the kernel clamping its loads), and
/// row-major with whole vec4s per row (k = 12, 8: packed four by four).
#[test]
fn matmul_kernels_match_cpu_on_awkward_shapes() {
    let mut gpu = gpu();
    let mut rng = Rng::new(5);
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for (m, k, n) in [
            (1, 1, 1),
            (33, 17, 40),
            (64, 7, 48),
            (5, 300, 130),
            (97, 2, 300),
            (36, 12, 20),
            (4, 8, 4),
        ] {
            for (transpose_a, transpose_b) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let product = MatMul {
                    transpose_a,
                    transpose_b,
                };
                let a = random(&if transpose_a { [k, m] } else { [m, k] }, &mut rng);
                let b = random(&if transpose_b { [n, k] } else { [k, n] }, &mut rng);
                let mut g = Graph::new(false);
                let ids = [a.shape.clone(), b.shape.clone()]
                    .map(|shape| g.param(format!("{shape:?}"), shape, Init::Zeros));
                let c = g.apply1(product, &ids).unwrap();
                let store = ParamStore::new(&gpu, &g).unwrap();
                store.write(&gpu, 0, &a.data).unwrap();
                store.write(&gpu, 1, &b.data).unwrap();
                let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
                plan.run(&gpu);
                assert_op_close(
                    &format!(
                        "{kernel:?} {} with A {:?}, B {:?}",
                        product.describe(),
                        a.shape,
                        b.shape
                    ),
                    &plan.read_f32(&gpu, &g, c).unwrap(),
                    &product.cpu(&a, &b).data,
                );
            }
        }
    }
}

#[test]
fn linear_matches_cpu_on_awkward_shapes() {
    let gpu = gpu();
    let mut rng = Rng::new(3);
    for (batch, inputs, outputs) in [(1, 7, 5), (3, 13, 6), (5, 1, 1), (9, 33, 10)] {
        let x = random(&[batch, inputs], &mut rng);
        let w = random(&[outputs, inputs], &mut rng);
        let b = random(&[outputs], &mut rng);
        let y = Linear::cpu_forward(&x, &w, &b.data);
        let dy = random(&y.shape, &mut rng);
        let (dx, dw, db) = Linear::cpu_backward(&x, &w, &dy);
        let r = run_op(&gpu, Linear, &[&x, &w, &b], &dy);
        let case = format!("linear {batch}x{inputs} -> {outputs}");
        assert_op_close(&format!("{case} y"), &r.output, &y.data);
        assert_op_close(&format!("{case} dx"), &r.input_grads[0], &dx.data);
        assert_op_close(&format!("{case} dweight"), &r.input_grads[1], &dw.data);
        assert_op_close(&format!("{case} dbias"), &r.input_grads[2], &db);
    }
}

/// `F.avg_pool2d` (and `adaptive_avg_pool2d(x, 1)` as a window over the
/// whole plane) against PyTorch.
#[test]
fn avg_pool_matches_pytorch() {
    let gpu = gpu();
    let mut names = golden_ops("avgpool_");
    names.extend(golden_ops("global_avgpool_"));
    for name in names {
        let gold = Golden::load(&name);
        let (x, dy) = (gold.f32("x"), gold.f32("dy"));
        let pool = if name.contains("global") {
            AvgPool2d::new(x.shape[2], x.shape[2])
        } else {
            AvgPool2d::new(gold.meta_usize("kernel"), gold.meta_usize("stride"))
        };
        let r = run_op(&gpu, pool, &[&x], &dy);
        assert_op_close(&format!("{name} y"), &r.output, &gold.f32("y").data);
        assert_op_close(
            &format!("{name} dx"),
            &r.input_grads[0],
            &gold.f32("dx").data,
        );
        assert_op_close(
            &format!("{name} cpu y"),
            &pool.cpu_forward(&x).data,
            &gold.f32("y").data,
        );
        assert_op_close(
            &format!("{name} cpu dx"),
            &pool.cpu_backward(&x.shape, &dy).data,
            &gold.f32("dx").data,
        );
    }
}

#[test]
fn avg_pool_matches_cpu_on_awkward_shapes() {
    let gpu = gpu();
    let mut rng = Rng::new(5);
    let cases = [
        ([1, 3, 7, 5], (3, 3), (2, 2), (1, 1)),
        ([2, 2, 5, 5], (2, 2), (1, 1), (0, 0)),
        ([1, 1, 9, 4], (3, 2), (3, 1), (1, 1)),
        ([2, 3, 11, 10], (2, 3), (3, 4), (1, 1)),
    ];
    for (xs, kernel, stride, padding) in cases {
        let pool = AvgPool2d(PoolWindow {
            kernel,
            stride,
            padding,
        });
        let x = random(&xs, &mut rng);
        let y = pool.cpu_forward(&x);
        let dy = random(&y.shape, &mut rng);
        let r = run_op(&gpu, pool, &[&x], &dy);
        assert_op_close(&format!("{pool:?} y"), &r.output, &y.data);
        assert_op_close(
            &format!("{pool:?} dx"),
            &r.input_grads[0],
            &pool.cpu_backward(&xs, &dy).data,
        );
    }
}

/// `x[:, :, ::2, ::2]` as `F.avg_pool2d(x, 1, 2)`, and its gradient: dy at
/// x's even pixels, zeros elsewhere. Planes of even height whose output rows
/// are whole vec4s take the `*_even_pixels` kernels, one output row per
/// invocation (one, two and three vec4s a row here; 528,000 rows, more
/// workgroups than one grid dimension holds); the rest the element
/// kernels.
#[test]
fn even_pixels_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(31);
    let pool = AvgPool2d(PoolWindow::EVEN_PIXELS);
    for (xs, rows_kernel) in [
        ([2, 3, 8, 8], true),
        ([2, 33_000, 16, 8], true),
        ([1, 1, 2, 16], true),
        ([3, 2, 6, 24], true),
        ([2, 2, 7, 16], false),
        ([1, 3, 8, 12], false),
    ] {
        let x = random(&xs, &mut rng);
        let y = pool.cpu_forward(&x);
        let dy = random(&y.shape, &mut rng);
        let r = run_op(&gpu, pool, &[&x], &dy);
        assert_op_close(&format!("{xs:?} y"), &r.output, &y.data);
        let dx = pool.cpu_backward(&xs, &dy);
        assert_op_close(&format!("{xs:?} dx"), &r.input_grads[0], &dx.data);
        let taken = ["avg_forward_even_pixels", "avg_backward_even_pixels"]
            .map(|e| r.entry_points.contains(&e));
        assert_eq!(taken, [rows_kernel; 2], "{xs:?}: {:?}", r.entry_points);
    }
}

/// `nn.Conv2d(c_in, c_out, kernel_size=1, stride=2)` as the layer applies
/// it (`nn::ConvParameters::apply`): x's even pixels picked by a pool, then
/// the pointwise convolution, where `even_pixels_match_cpu`'s rows kernel
/// takes the pool; else the strided convolution. Either way the strided
/// convolution's CPU reference, forward and every gradient.
#[test]
fn strided_pointwise_conv_layer_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(37);
    let op = Conv2d {
        stride: (2, 2),
        padding: (0, 0),
    };
    for (xs, picks) in [
        ([2, 3, 8, 16], true),
        ([1, 5, 6, 8], true),
        ([2, 3, 8, 12], false),
        ([1, 2, 7, 16], false),
    ] {
        let x = random(&xs, &mut rng);
        let w = random(&[6, xs[1], 1, 1], &mut rng);
        let b = random(&[6], &mut rng);
        let y = op.cpu_forward(&x, &w, &b.data);
        let dy = random(&y.shape, &mut rng);
        let layer = |g: &mut Graph, ids: &[TensorId]| {
            let params = ConvParameters {
                op,
                weight: ids[1],
                bias: ids[2],
            };
            params.apply(g, ids[0]).expect("the layer accepts x")
        };
        let r = run_graph(&gpu, layer, &[&x, &w, &b], &dy);
        let (dx, dw, db) = op.cpu_backward(&x, &w, &dy);
        assert_op_close(&format!("{xs:?} y"), &r.output, &y.data);
        assert_op_close(&format!("{xs:?} dx"), &r.input_grads[0], &dx.data);
        assert_op_close(&format!("{xs:?} dw"), &r.input_grads[1], &dw.data);
        assert_op_close(&format!("{xs:?} db"), &r.input_grads[2], &db);
        let pooled = r.entry_points.iter().any(|e| e.starts_with("avg_forward"));
        assert_eq!(pooled, picks, "{xs:?}: {:?}", r.entry_points);
    }
}

/// `F.max_pool2d(x, k, s, p)` and its gradient, including windows with
/// equal maxima (PyTorch routes the gradient to the first, row by row).
/// 2 x 2 windows with stride 2 that tile the input (LeNet's, DenseNet's and
/// VGG's pools) take the `*_2x2` kernels, one invocation per window, when
/// every layout starts on an even element, and the `*_2x2_pairs` kernels,
/// two windows side by side per invocation, where rows are whole vec4s too;
/// planes of odd height or width take neither. Max pooling on values from a
/// few levels, so windows often hold equal maxima (the first one wins).
#[test]
fn pool_2x2_windows_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(29);
    let window = PoolWindow::new(2, 2);
    for (xs, family) in [
        ([2, 3, 6, 10], Some("_2x2")),
        ([1, 1, 2, 2], Some("_2x2")),
        ([3, 2, 4, 8], Some("_2x2_pairs")),
        ([1, 3, 2, 4], Some("_2x2_pairs")),
        ([2, 2, 7, 6], None),
        ([2, 2, 6, 5], None),
    ] {
        let mut x = random(&xs, &mut rng);
        x.data.iter_mut().for_each(|v| *v = (*v * 3.0).round());
        let avg = AvgPool2d(window);
        let y = avg.cpu_forward(&x);
        let dy = random(&y.shape, &mut rng);
        let r = run_op(&gpu, avg, &[&x], &dy);
        assert_op_close(&format!("avg {xs:?} y"), &r.output, &y.data);
        let dx = avg.cpu_backward(&xs, &dy);
        assert_op_close(&format!("avg {xs:?} dx"), &r.input_grads[0], &dx.data);
        let max = MaxPool2d(window);
        let (y, argmax) = max.cpu_forward(&x);
        let s = run_op(&gpu, max, &[&x], &dy);
        assert_op_close(&format!("max {xs:?} y"), &s.output, &y.data);
        let dx = max.cpu_backward(&xs, &dy, &argmax);
        assert_op_close(&format!("max {xs:?} dx"), &s.input_grads[0], &dx.data);
        let entries = [r.entry_points, s.entry_points].concat();
        let taken: Vec<&str> = entries.into_iter().filter(|e| e.contains("_2x2")).collect();
        let want: Vec<String> = family.map_or(vec![], |f| {
            ["avg_forward", "avg_backward", "max_forward", "max_backward"]
                .map(|k| format!("{k}{f}"))
                .to_vec()
        });
        assert_eq!(taken, want, "{xs:?}");
    }
}

#[test]
fn max_pool_matches_pytorch() {
    let gpu = gpu();
    for name in golden_ops("maxpool_") {
        let gold = Golden::load(&name);
        let window = PoolWindow::new(gold.meta_usize("kernel"), gold.meta_usize("stride"))
            .padding(gold.meta_usize("padding"));
        let pool = MaxPool2d(window);
        let (x, dy) = (gold.f32("x"), gold.f32("dy"));
        let r = run_op(&gpu, pool, &[&x], &dy);
        assert_op_close(&format!("{name} y"), &r.output, &gold.f32("y").data);
        assert_op_close(
            &format!("{name} dx"),
            &r.input_grads[0],
            &gold.f32("dx").data,
        );
        let (y, argmax) = pool.cpu_forward(&x);
        assert_op_close(&format!("{name} cpu y"), &y.data, &gold.f32("y").data);
        let dx = pool.cpu_backward(&x.shape, &dy, &argmax);
        assert_op_close(&format!("{name} cpu dx"), &dx.data, &gold.f32("dx").data);
    }
}

#[test]
fn max_pool_matches_cpu_on_awkward_shapes() {
    let gpu = gpu();
    let mut rng = Rng::new(23);
    let cases = [
        ([1, 3, 7, 5], (3, 3), (2, 2), (1, 1)),
        ([2, 2, 5, 5], (2, 2), (1, 1), (0, 0)),
        ([1, 1, 9, 4], (3, 2), (3, 1), (1, 1)),
        ([3, 1, 6, 6], (3, 3), (2, 2), (0, 0)),
        ([2, 3, 11, 10], (2, 3), (3, 4), (1, 1)),
        // GoogLeNet's windows, over rows of whole vec4s and rows that are not.
        ([2, 3, 8, 12], (3, 3), (2, 2), (1, 1)),
        ([2, 2, 6, 6], (3, 3), (1, 1), (1, 1)),
        ([1, 2, 5, 8], (3, 3), (1, 1), (1, 1)),
        ([2, 2, 7, 12], (3, 3), (2, 2), (1, 1)),
    ];
    for (xs, kernel, stride, padding) in cases {
        let pool = MaxPool2d(PoolWindow {
            kernel,
            stride,
            padding,
        });
        // Values from a few levels, so windows often hold equal maxima.
        let mut x = random(&xs, &mut rng);
        x.data.iter_mut().for_each(|v| *v = (*v * 3.0).round());
        let (y, argmax) = pool.cpu_forward(&x);
        let dy = random(&y.shape, &mut rng);
        let r = run_op(&gpu, pool, &[&x], &dy);
        assert_op_close(&format!("{pool:?} y"), &r.output, &y.data);
        assert_op_close(
            &format!("{pool:?} dx"),
            &r.input_grads[0],
            &pool.cpu_backward(&xs, &dy, &argmax).data,
        );
    }
}

/// Everything one batch-norm layer computes: training output, gradients,
/// updated running statistics, and the evaluation output that follows.
struct BatchNormRun {
    y: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    y_eval: Vec<f32>,
    /// Activation bytes of the training plan a buffer per tensor would
    /// take, less those it planned.
    unallocated: u64,
}

/// Batch norm's gamma, beta, running mean and running variance (positive)
/// for `c` channels.
fn random_norm_parameters(c: usize, rng: &mut Rng) -> [Vec<f32>; 4] {
    let mut v = || random(&[c], rng).data;
    let (gamma, beta, mean) = (v(), v(), v());
    let var = v().iter().map(|v| v.abs() + 0.5).collect();
    [gamma, beta, mean, var]
}

/// Runs a training step of batch norm (with autodiff from `dy`), then an
/// evaluation pass over the same x with the updated running statistics;
/// with `activation`, of the activation after batch norm.
fn run_batch_norm(
    gpu: &Gpu,
    (x, activation): (&CpuTensor, Option<Activation>),
    gamma: &[f32],
    beta: &[f32],
    running: (&[f32], &[f32]),
    dy: &CpuTensor,
) -> BatchNormRun {
    let c = gamma.len();
    let build = |training: bool| {
        let mut g = Graph::new(training);
        let xi = g.leaf(x.shape.clone());
        let gi = g.param("weight".into(), vec![c], Init::Ones);
        let bi = g.param("bias".into(), vec![c], Init::Zeros);
        let mean = g.state("running_mean".into(), vec![c], Init::Zeros);
        let var = g.state("running_var".into(), vec![c], Init::Ones);
        let mut y = g
            .apply1(BatchNorm::new(training), &[xi, gi, bi, mean, var])
            .unwrap();
        if let Some(activation) = activation {
            y = g.apply1(activation, &[y]).unwrap();
        }
        (g, xi, y)
    };
    let (mut g, xi, y) = build(true);
    let dy_id = g.input(dy.shape.clone(), DType::F32);
    let grads = autodiff::backward(&mut g, &[(y, dy_id)]).unwrap();
    let store = ParamStore::new(gpu, &g).unwrap();
    store.write(gpu, 0, gamma).unwrap();
    store.write(gpu, 1, beta).unwrap();
    store.write_state(gpu, 0, running.0).unwrap();
    store.write_state(gpu, 1, running.1).unwrap();
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(gpu, &g, xi, &x.data).unwrap();
    plan.write_f32(gpu, &g, dy_id, &dy.data).unwrap();
    plan.run(gpu);
    let (eval_graph, eval_x, y_eval) = build(false);
    let eval = Plan::new(gpu, &eval_graph, &store, &Externals::new()).unwrap();
    eval.write_f32(gpu, &eval_graph, eval_x, &x.data).unwrap();
    eval.run(gpu);
    BatchNormRun {
        y: plan.read_f32(gpu, &g, y).unwrap(),
        dx: plan.read_f32(gpu, &g, grads[&xi]).unwrap(),
        dgamma: store.read_grad(gpu, 0).unwrap(),
        dbeta: store.read_grad(gpu, 1).unwrap(),
        running_mean: store.read_state(gpu, 0).unwrap(),
        running_var: store.read_state(gpu, 1).unwrap(),
        y_eval: eval.read_f32(gpu, &eval_graph, y_eval).unwrap(),
        unallocated: plan.unshared_activation_bytes - plan.activation_bytes,
    }
}

/// `F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
/// momentum=0.1, eps=1e-5)`, its gradients, the running statistics it leaves
/// and the eval-mode output with them, for (N, C, H, W) and (N, C).
#[test]
fn batch_norm_matches_pytorch() {
    let gpu = gpu();
    for name in ["ops/batchnorm2d.safetensors", "ops/batchnorm1d.safetensors"] {
        let gold = Golden::load(name);
        let (x, dy) = (gold.f32("x"), gold.f32("dy"));
        let (gamma, beta) = (gold.f32("weight").data, gold.f32("bias").data);
        let (rm, rv) = (
            gold.f32("running_mean_before").data,
            gold.f32("running_var_before").data,
        );
        let r = run_batch_norm(&gpu, (&x, None), &gamma, &beta, (&rm, &rv), &dy);
        assert_op_close(&format!("{name} y"), &r.y, &gold.f32("y").data);
        assert_op_close(&format!("{name} dx"), &r.dx, &gold.f32("dx").data);
        assert_op_close(
            &format!("{name} dweight"),
            &r.dgamma,
            &gold.f32("dweight").data,
        );
        assert_op_close(&format!("{name} dbias"), &r.dbeta, &gold.f32("dbias").data);
        assert_op_close(
            &format!("{name} running_mean"),
            &r.running_mean,
            &gold.f32("running_mean_after").data,
        );
        assert_op_close(
            &format!("{name} running_var"),
            &r.running_var,
            &gold.f32("running_var_after").data,
        );
        assert_op_close(
            &format!("{name} y_eval"),
            &r.y_eval,
            &gold.f32("y_eval").data,
        );

        let norm = BatchNorm::new(true);
        let cpu = norm.cpu_train(&x, &gamma, &beta, (&rm, &rv));
        assert_op_close(&format!("{name} cpu y"), &cpu.y.data, &gold.f32("y").data);
        assert_op_close(
            &format!("{name} cpu running_var"),
            &cpu.running_var,
            &gold.f32("running_var_after").data,
        );
        let (dx, dgamma, _) = norm.cpu_backward(&x, &gamma, &dy);
        assert_op_close(&format!("{name} cpu dx"), &dx.data, &gold.f32("dx").data);
        assert_op_close(
            &format!("{name} cpu dweight"),
            &dgamma,
            &gold.f32("dweight").data,
        );
        let eval = norm.cpu_eval(&x, &gamma, &beta, (&cpu.running_mean, &cpu.running_var));
        assert_op_close(
            &format!("{name} cpu y_eval"),
            &eval.data,
            &gold.f32("y_eval").data,
        );
    }
}

/// Batch 2 (the smallest with a variance), odd channel counts, a large
/// spatial extent (many splits) and values far from zero (a naive
/// E[x^2] - E[x]^2 would lose the variance); planes of whole vec4s (4 x 6,
/// 16 x 12, 10 x 10, and 32 x 40 in 160 splits), which take the
/// four-at-a-time kernels, sums included: runs of 16 vec4s of a plane, the
/// last one shorter (6, 25) or not (48, 320).
#[test]
fn batch_norm_matches_cpu_on_awkward_shapes() {
    let gpu = gpu();
    let mut rng = Rng::new(29);
    for shape in [
        vec![2, 3],
        vec![2, 1],
        vec![2, 5, 3, 7],
        vec![3, 7, 1, 1],
        vec![16, 3, 61, 67],
        vec![3, 5, 4, 6],
        vec![2, 3, 16, 12],
        vec![8, 3, 32, 40],
        vec![3, 5, 10, 10],
    ] {
        let c = shape[1];
        let mut x = random(&shape, &mut rng);
        x.data.iter_mut().for_each(|v| *v = 100.0 + 2.0 * *v);
        let [gamma, beta, rm, rv] = random_norm_parameters(c, &mut rng);
        let dy = random(&shape, &mut rng);
        let r = run_batch_norm(&gpu, (&x, None), &gamma, &beta, (&rm, &rv), &dy);
        let norm = BatchNorm::new(true);
        let cpu = norm.cpu_train(&x, &gamma, &beta, (&rm, &rv));
        let (dx, dgamma, dbeta) = norm.cpu_backward(&x, &gamma, &dy);
        let case = format!("batch norm {shape:?}");
        assert_op_close(&format!("{case} y"), &r.y, &cpu.y.data);
        assert_op_close(&format!("{case} dx"), &r.dx, &dx.data);
        assert_op_close(&format!("{case} dgamma"), &r.dgamma, &dgamma);
        assert_op_close(&format!("{case} dbeta"), &r.dbeta, &dbeta);
        assert_op_close(
            &format!("{case} running_mean"),
            &r.running_mean,
            &cpu.running_mean,
        );
        assert_op_close(
            &format!("{case} running_var"),
            &r.running_var,
            &cpu.running_var,
        );
        let eval = norm.cpu_eval(&x, &gamma, &beta, (&cpu.running_mean, &cpu.running_var));
        assert_op_close(&format!("{case} y_eval"), &r.y_eval, &eval.data);
    }
}

/// Batch norm reading and writing channel slices of a concatenation:
/// `a = bn(x1)` and `b = bn(x2)` written side by side into `cat(a, b)`,
/// then `y = bn(b)`, which reads b three channels into it (an offset and a
/// sample stride that are not those of a tensor of its own), on planes of
/// whole vec4s (4 x 6: runs of vec4s) and not (5 x 5); y and the gradients
/// of x2 and of both norms that b passes through against the CPU
/// references.
#[test]
fn batch_norm_reads_and_writes_channel_slices() {
    let gpu = gpu();
    let mut rng = Rng::new(43);
    let norm = BatchNorm::new(true);
    for [h, w] in [[4, 6], [5, 5]] {
        let x1 = random(&[3, 3, h, w], &mut rng);
        let x2 = random(&[3, 5, h, w], &mut rng);
        let [gamma1, beta1, _, _] = random_norm_parameters(3, &mut rng);
        let [gamma2, beta2, _, _] = random_norm_parameters(5, &mut rng);
        let [gamma3, beta3, _, _] = random_norm_parameters(5, &mut rng);
        let fresh = |c: usize| (vec![0.0; c], vec![1.0; c]);
        let (m5, v5) = fresh(5);
        let b = norm.cpu_train(&x2, &gamma2, &beta2, (&m5, &v5)).y;
        let y = norm.cpu_train(&b, &gamma3, &beta3, (&m5, &v5)).y;
        let dy = random(&y.shape, &mut rng);
        let (db, dgamma3, dbeta3) = norm.cpu_backward(&b, &gamma3, &dy);
        let (dx2, dgamma2, dbeta2) = norm.cpu_backward(&x2, &gamma2, &db);

        let mut g = Graph::new(true);
        let (x1_id, x2_id) = (g.leaf(x1.shape.clone()), g.leaf(x2.shape.clone()));
        let values = [&gamma1, &beta1, &gamma2, &beta2, &gamma3, &beta3];
        let p: Vec<_> = (values.iter().enumerate())
            .map(|(i, v)| g.param(format!("p{i}"), vec![v.len()], Init::Zeros))
            .collect();
        let mut norm_of = |x, (gamma, beta), c: usize| {
            let mean = g.state(format!("mean{}", p.len()), vec![c], Init::Zeros);
            let var = g.state(format!("var{}", p.len()), vec![c], Init::Ones);
            g.apply(norm, &[x, gamma, beta, mean, var]).unwrap()[0]
        };
        let a = norm_of(x1_id, (p[0], p[1]), 3);
        let b_id = norm_of(x2_id, (p[2], p[3]), 5);
        let y_id = norm_of(b_id, (p[4], p[5]), 5);
        g.concat(&[a, b_id]).unwrap();
        let dy_id = g.input(dy.shape.clone(), DType::F32);
        let grads = autodiff::backward(&mut g, &[(y_id, dy_id)]).unwrap();
        let store = ParamStore::new(&gpu, &g).unwrap();
        for (i, v) in values.iter().enumerate() {
            store.write(&gpu, i, v).unwrap();
        }
        let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
        for (id, t) in [(x1_id, &x1), (x2_id, &x2), (dy_id, &dy)] {
            plan.write_f32(&gpu, &g, id, &t.data).unwrap();
        }
        plan.run(&gpu);
        let case = format!("{h}x{w}");
        let got_y = plan.read_f32(&gpu, &g, y_id).unwrap();
        assert_op_close(&format!("{case} y"), &got_y, &y.data);
        let got_dx2 = plan.read_f32(&gpu, &g, grads[&x2_id]).unwrap();
        assert_op_close(&format!("{case} dx2"), &got_dx2, &dx2.data);
        for (i, want) in [(2, &dgamma2), (3, &dbeta2), (4, &dgamma3), (5, &dbeta3)] {
            let got = store.read_grad(&gpu, i).unwrap();
            assert_op_close(&format!("{case} gradient of p{i}"), &got, want);
        }
    }
}

/// A tensor read by batch norm and by something else gets the sum of two
/// gradients; batch norm's data gradient adds the other as it stores it
/// (the sum gets no pass and batch norm's gradient no memory): the other
/// gradient fed in directly, or a channel slice of a concatenation's
/// gradient as in DenseNet (`cat(x, f(bn(x)))`), on planes of whole vec4s and
/// not. Where the other gradient is computed after batch norm's (`relu(x)`
/// built before `bn(x)`), the sum stays a pass of its own. dx against the
/// CPU references.
#[test]
fn sums_fuse_into_batch_norm_data_gradients() {
    #[derive(Debug, Clone, Copy)]
    enum Other {
        Direct,
        Concatenated,
        Later,
    }
    let gpu = gpu();
    let mut rng = Rng::new(53);
    let norm = BatchNorm::new(true);
    for shape in [[2, 3, 4, 4], [2, 5, 3, 7]] {
        for other in [Other::Direct, Other::Concatenated, Other::Later] {
            let c = shape[1];
            let x = random(&shape, &mut rng);
            let [gamma, beta, _, _] = random_norm_parameters(c, &mut rng);
            let (dy, d_other) = (random(&shape, &mut rng), random(&shape, &mut rng));
            let other_dx = match other {
                Other::Later => {
                    Activation::Relu.cpu_backward(&Activation::Relu.cpu_forward(&x), &d_other)
                }
                _ => d_other.clone(),
            };
            let (bn_dx, _, _) = norm.cpu_backward(&x, &gamma, &dy);
            let want: Vec<f32> = (bn_dx.data.iter().zip(&other_dx.data))
                .map(|(a, b)| a + b)
                .collect();

            let mut g = Graph::new(true);
            let x0_id = g.leaf(shape.to_vec());
            // x an op's output (a concatenation takes only those); not an
            // activation, whose backward would take the sum in its turn.
            let x_id = g.apply1(AvgPool2d::new(1, 1), &[x0_id]).unwrap();
            let later =
                matches!(other, Other::Later).then(|| g.apply1(Activation::Relu, &[x_id]).unwrap());
            let gamma_id = g.param("weight".into(), vec![c], Init::Zeros);
            let beta_id = g.param("bias".into(), vec![c], Init::Zeros);
            let mean = g.state("running_mean".into(), vec![c], Init::Zeros);
            let var = g.state("running_var".into(), vec![c], Init::Ones);
            let y_id = g
                .apply1(norm, &[x_id, gamma_id, beta_id, mean, var])
                .unwrap();
            let (dy_id, d_other_id) = (
                g.input(shape.to_vec(), DType::F32),
                g.input(shape.to_vec(), DType::F32),
            );
            let seeds = match other {
                Other::Direct => vec![(y_id, dy_id), (x_id, d_other_id)],
                Other::Later => vec![(y_id, dy_id), (later.unwrap(), d_other_id)],
                Other::Concatenated => {
                    // A 1x1 pool (identity) between: batch norm cannot
                    // write the concatenation it reads.
                    let pooled = g.apply1(AvgPool2d::new(1, 1), &[y_id]).unwrap();
                    let z = g.concat(&[x_id, pooled]).unwrap();
                    let dz = g.input(vec![shape[0], 2 * c, shape[2], shape[3]], DType::F32);
                    vec![(z, dz)]
                }
            };
            let grads = autodiff::backward(&mut g, &seeds).unwrap();
            let store = ParamStore::new(&gpu, &g).unwrap();
            store.write(&gpu, 0, &gamma).unwrap();
            store.write(&gpu, 1, &beta).unwrap();
            let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
            plan.write_f32(&gpu, &g, x0_id, &x.data).unwrap();
            match other {
                Other::Concatenated => {
                    let plane = shape[2] * shape[3];
                    let dz: Vec<f32> = (0..shape[0])
                        .flat_map(|n| {
                            let sample = n * c * plane..(n + 1) * c * plane;
                            [&d_other.data[sample.clone()], &dy.data[sample]].concat()
                        })
                        .collect();
                    plan.write_f32(&gpu, &g, seeds[0].1, &dz).unwrap();
                }
                _ => {
                    plan.write_f32(&gpu, &g, dy_id, &dy.data).unwrap();
                    plan.write_f32(&gpu, &g, d_other_id, &d_other.data).unwrap();
                }
            }
            plan.run(&gpu);
            let case = format!("{shape:?} {other:?}");
            let got = plan.read_f32(&gpu, &g, grads[&x_id]).unwrap();
            assert_op_close(&format!("{case} dx"), &got, &want);
            // Batch norm's own gradient, where it takes the sum.
            let elided = match other {
                Other::Later => 0,
                _ => 4 * x.data.len() as u64,
            };
            assert_elided(&plan, elided, &case);
        }
    }
}

/// Inverted dropout: the GPU keeps exactly the elements the CPU mirror of
/// its hash keeps, scales them by 1 / (1 - p), keeps about 1 - p of them,
/// routes the gradient through the same mask, and draws a new mask after
/// the stream advances.
#[test]
fn dropout_matches_its_cpu_mask() {
    let gpu = gpu();
    let mut rng = Rng::new(31);
    for (shape, p) in [
        (vec![64, 1000], 0.5f32),
        (vec![3, 7, 11], 0.1),
        (vec![1, 5], 0.9),
    ] {
        let x = random(&shape, &mut rng);
        let dy = random(&shape, &mut rng);
        let dropout = Dropout { p, salt: 1234 };
        let mut g = Graph::new(true);
        let xi = g.leaf(shape.clone());
        let stream = g.external("dropout_rng", vec![2], DType::U32);
        let y = g.apply1(dropout, &[xi, stream]).unwrap();
        let dy_id = g.input(shape.clone(), DType::F32);
        let grads = autodiff::backward(&mut g, &[(y, dy_id)]).unwrap();
        g.apply_into(AdvanceRng, &[], &[stream]);
        let seed = 77u32;
        let stream_buffer = gpu.storage_buffer("stream", 8).unwrap();
        gpu.queue
            .write_buffer(&stream_buffer, 0, bytemuck::cast_slice(&[seed, 0u32]));
        let mut externals = Externals::new();
        externals.insert(
            "dropout_rng",
            d2l_wgpu::graph::Binding::whole(&stream_buffer),
        );
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &externals).unwrap();
        plan.write_f32(&gpu, &g, xi, &x.data).unwrap();
        plan.write_f32(&gpu, &g, dy_id, &dy.data).unwrap();
        let mut masks = Vec::new();
        for step in 0..2u32 {
            plan.run(&gpu);
            let got = plan.read_f32(&gpu, &g, y).unwrap();
            let dx = plan.read_f32(&gpu, &g, grads[&xi]).unwrap();
            let keep: Vec<bool> = (0..x.data.len() as u32)
                .map(|i| dropout_keeps(seed, 1234, step, i, p))
                .collect();
            let scale = 1.0 / (1.0 - p);
            let want: Vec<f32> = x
                .data
                .iter()
                .zip(&keep)
                .map(|(v, &k)| if k { v * scale } else { 0.0 })
                .collect();
            let want_dx: Vec<f32> = dy
                .data
                .iter()
                .zip(&keep)
                .map(|(v, &k)| if k { v * scale } else { 0.0 })
                .collect();
            assert_op_close(
                &format!("dropout {shape:?} p {p} step {step} y"),
                &got,
                &want,
            );
            assert_op_close(
                &format!("dropout {shape:?} p {p} step {step} dx"),
                &dx,
                &want_dx,
            );
            masks.push(keep);
        }
        let counter: Vec<u32> =
            bytemuck::cast_slice(&gpu.read_bytes(&stream_buffer, 0, 8).unwrap()).to_vec();
        assert_eq!(counter, [seed, 2], "two steps advance the stream twice");
        if x.data.len() >= 1000 {
            let kept = masks[0].iter().filter(|&&k| k).count() as f32 / x.data.len() as f32;
            assert!(
                (kept - (1.0 - p)).abs() < 0.01,
                "kept {kept}, expected about {}",
                1.0 - p
            );
            assert_ne!(masks[0], masks[1], "each step draws a new mask");
        }
    }
}

/// `torch.sigmoid(x)` and `torch.relu(x)` with their gradients.
#[test]
fn activations_match_pytorch() {
    let gpu = gpu();
    for (name, act) in [("sigmoid", Activation::Sigmoid), ("relu", Activation::Relu)] {
        let gold = Golden::load(&format!("ops/{name}.safetensors"));
        let (x, dy) = (gold.f32("x"), gold.f32("dy"));
        let r = run_op(&gpu, act, &[&x], &dy);
        assert_golden(name, &gold, &[("y", &r.output), ("dx", &r.input_grads[0])]);
        let y = act.cpu_forward(&x);
        let dx = act.cpu_backward(&y, &dy);
        assert_golden(
            &format!("{name} cpu"),
            &gold,
            &[("y", &y.data), ("dx", &dx.data)],
        );
    }
}

/// ReLU passes NaN through, as PyTorch's does (`torch.relu(nan)` is nan),
/// on the GPU four elements at a time and one at a time, and on the CPU.
#[test]
fn relu_passes_nan_through() {
    let gpu = gpu();
    for len in [4, 3] {
        let x = CpuTensor::new(&[1, len], vec![f32::NAN, -1.5, 2.0, -0.5][..len].to_vec());
        let dy = CpuTensor::new(&[1, len], vec![1.0; len]);
        let gpu_y = run_op(&gpu, Activation::Relu, &[&x], &dy).output;
        let cpu_y = Activation::Relu.cpu_forward(&x).data;
        for (what, y) in [("gpu", &gpu_y), ("cpu", &cpu_y)] {
            assert!(y[0].is_nan(), "{what} relu(NaN) = {}", y[0]);
            assert_eq!(&y[1..], &[0.0, 2.0, 0.0][..len - 1], "{what}");
        }
    }
}

/// Activations, their gradients and the sum against the CPU on samples of
/// whole vec4s (48 elements: the four-at-a-time kernels) and not (75).
#[test]
fn elementwise_kernels_match_cpu_with_and_without_vec4_samples() {
    let gpu = gpu();
    let mut rng = Rng::new(41);
    for shape in [[2, 3, 4, 4], [2, 3, 5, 5]] {
        for act in [Activation::Sigmoid, Activation::Relu] {
            let (x, dy) = (random(&shape, &mut rng), random(&shape, &mut rng));
            let r = run_op(&gpu, act, &[&x], &dy);
            let y = act.cpu_forward(&x);
            assert_op_close(&format!("{act:?} {shape:?} y"), &r.output, &y.data);
            let dx = act.cpu_backward(&y, &dy);
            assert_op_close(
                &format!("{act:?} {shape:?} dx"),
                &r.input_grads[0],
                &dx.data,
            );
        }
        let (a, b) = (random(&shape, &mut rng), random(&shape, &mut rng));
        let mut g = Graph::new(false);
        let (ai, bi) = (
            g.input(shape.to_vec(), DType::F32),
            g.input(shape.to_vec(), DType::F32),
        );
        let sum = g.apply1(d2l_wgpu::ops::Add, &[ai, bi]).unwrap();
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
        plan.write_f32(&gpu, &g, ai, &a.data).unwrap();
        plan.write_f32(&gpu, &g, bi, &b.data).unwrap();
        plan.run(&gpu);
        let want: Vec<f32> = a.data.iter().zip(&b.data).map(|(a, b)| a + b).collect();
        assert_op_close(
            &format!("add {shape:?}"),
            &plan.read_f32(&gpu, &g, sum).unwrap(),
            &want,
        );
    }
}

/// An elementwise op over more elements than 65,535 workgroups cover, on
/// any workgroup size up to 64.
#[test]
fn elementwise_beyond_one_grid_dimension() {
    let gpu = gpu();
    let mut rng = Rng::new(13);
    let x = random(&[65_535 * 64 + 77], &mut rng);
    let dy = random(&x.shape, &mut rng);
    let r = run_op(&gpu, Activation::Sigmoid, &[&x], &dy);
    let y = Activation::Sigmoid.cpu_forward(&x);
    assert_op_close("sigmoid y", &r.output, &y.data);
    let dx = Activation::Sigmoid.cpu_backward(&y, &dy);
    assert_op_close("sigmoid dx", &r.input_grads[0], &dx.data);
}

/// Pooling over more than 2^24 elements, where an f32 no longer holds every
/// flat index exactly: the kernels' index arithmetic must stay exact.
#[test]
fn pooling_beyond_f32_exact_indices() {
    let gpu = gpu();
    let mut rng = Rng::new(29);
    let x = random(&[2, 3, 1501, 1900], &mut rng);
    let window = PoolWindow::new(3, 2).padding(1);
    let avg = AvgPool2d(window);
    let y = avg.cpu_forward(&x);
    let dy = random(&y.shape, &mut rng);
    let r = run_op(&gpu, avg, &[&x], &dy);
    assert_op_close("avg_pool2d y", &r.output, &y.data);
    let dx = avg.cpu_backward(&x.shape, &dy);
    assert_op_close("avg_pool2d dx", &r.input_grads[0], &dx.data);
    let max = MaxPool2d(window);
    let (y, argmax) = max.cpu_forward(&x);
    let r = run_op(&gpu, max, &[&x], &dy);
    assert_op_close("max_pool2d y", &r.output, &y.data);
    let dx = max.cpu_backward(&x.shape, &dy, &argmax);
    assert_op_close("max_pool2d dx", &r.input_grads[0], &dx.data);
}

/// Channel sums (bias gradients) over many terms, odd channel counts and
/// batch 1, against an f64 CPU sum; planes of whole vec4s take the kernel
/// that reads four terms at a time.
#[test]
fn channel_sum_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(17);
    for shape in [
        vec![1, 3, 5, 7],
        vec![7, 5],
        vec![256, 6, 28, 28],
        vec![3, 2, 1000, 1001],
    ] {
        let x = random(&shape, &mut rng);
        let sum = ChannelSum::cpu(&x);
        let mut g = Graph::new(false);
        let input = g.input(shape.clone(), DType::F32);
        let out = g.apply1(ChannelSum, &[input]).unwrap();
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
        plan.write_f32(&gpu, &g, input, &x.data).unwrap();
        plan.run(&gpu);
        let got = plan.read_f32(&gpu, &g, out).unwrap();
        let spatial: usize = shape[2..].iter().product();
        assert_eq!(
            plan.entry_points().contains(&"channel_sums_quads"),
            spatial.is_multiple_of(4),
            "{shape:?}: vec4 terms where planes are whole vec4s"
        );
        let terms = x.data.len() / shape[1];
        let exact: Vec<f32> = (0..shape[1])
            .map(|c| {
                (0..x.data.len())
                    .filter(|i| (i / spatial) % shape[1] == c)
                    .map(|i| x.data[i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        // Sums of `terms` values in [-1, 1]: allow f32 rounding that grows with sqrt(terms).
        let atol = 1e-5 * (terms as f32).sqrt().max(1.0) * 10.0;
        assert_close(&format!("channel sum {shape:?}"), &got, &exact, atol, 1e-5);
        assert_close(
            &format!("cpu channel sum {shape:?}"),
            &sum,
            &exact,
            atol,
            1e-5,
        );
    }
}

/// `F.cross_entropy(logits, labels)` (mean) and its gradient, including
/// logits around 100 where a naive softmax overflows.
#[test]
fn softmax_cross_entropy_matches_pytorch() {
    let gpu = gpu();
    for name in ["ops/xent.safetensors", "ops/xent_large_logits.safetensors"] {
        let gold = Golden::load(name);
        let logits = gold.f32("logits");
        let labels: Vec<u32> = gold.i64("labels").iter().map(|&l| l as u32).collect();
        let mut g = Graph::new(true);
        let z = g.input(logits.shape.clone(), DType::F32);
        let y = g.input(vec![labels.len()], DType::U32);
        let out = g
            .apply(SoftmaxCrossEntropy { with_grad: true }, &[z, y])
            .unwrap();
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
        plan.write_f32(&gpu, &g, z, &logits.data).unwrap();
        plan.write_u32(&gpu, y, &labels);
        plan.run(&gpu);
        let losses = plan.read_f32(&gpu, &g, out[0]).unwrap();
        let mean = losses.iter().sum::<f32>() / losses.len() as f32;
        assert_op_close(&format!("{name} loss"), &[mean], &gold.f32("loss").data);
        assert_op_close(
            &format!("{name} dlogits"),
            &plan.read_f32(&gpu, &g, out[2]).unwrap(),
            &gold.f32("dlogits").data,
        );
        let (cpu_loss, cpu_dlogits) = SoftmaxCrossEntropy::cpu(&logits, &labels);
        assert_op_close(
            &format!("{name} cpu loss"),
            &[cpu_loss],
            &gold.f32("loss").data,
        );
        assert_op_close(
            &format!("{name} cpu dlogits"),
            &cpu_dlogits.data,
            &gold.f32("dlogits").data,
        );
        let correct = plan.read_u32(&gpu, &g, out[1]).unwrap();
        for (row, &label) in labels.iter().enumerate() {
            let z = &logits.data[row * 10..row * 10 + 10];
            let argmax = (0..10).fold(0, |best, c| if z[c] > z[best] { c } else { best });
            assert_eq!(
                correct[row],
                u32::from(argmax == label as usize),
                "{name} row {row} correctness"
            );
        }
    }
}

/// d2l's `ToTensor` + `Resize(R)`: u8 / 255, bilinear, align_corners=False.
#[test]
fn gather_resize_matches_pytorch() {
    let gpu = gpu();
    for (name, size) in [
        ("ops/resize_96.safetensors", 96),
        ("ops/resize_224.safetensors", 224),
    ] {
        let gold = Golden::load(name);
        let (shape, pixels) = gold.u8("x_u8");
        let (count, h, w) = (shape[0], shape[2], shape[3]);
        let dataset = Dataset {
            images: pixels.clone(),
            labels: vec![0; count],
            height: h,
            width: w,
        };
        let device_data = GpuDataset::upload(&gpu, &dataset).unwrap();
        let mut g = Graph::new(false);
        let px = g.external("pixels", vec![count, h, w], DType::U8);
        let labels = g.external("labels", vec![count], DType::U32);
        let indices = g.input(vec![count], DType::U32);
        let out = g
            .apply(GatherResize { size }, &[px, labels, indices])
            .unwrap();
        let mut externals = Externals::new();
        device_data.bind(&mut externals);
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &externals).unwrap();
        plan.write_u32(&gpu, indices, &(0..count as u32).collect::<Vec<_>>());
        plan.run(&gpu);
        let want = gold.f32("y");
        assert_op_close(
            &format!("{name} gpu"),
            &plan.read_f32(&gpu, &g, out[0]).unwrap(),
            &want.data,
        );
        let cpu: Vec<f32> = (0..count)
            .flat_map(|i| GatherResize { size }.cpu(dataset.image(i), h, w).data)
            .collect();
        assert_op_close(&format!("{name} cpu"), &cpu, &want.data);
    }
}

/// Batches at the dataset's own size (LeNet's 28 x 28): images of whole
/// 4-byte words take the kernel that converts a word's four pixels at once,
/// 5 x 5 ones the resizing kernel; both give ToTensor's byte / 255, and the
/// labels, for indices out of order and repeated.
#[test]
fn gather_at_the_dataset_size_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(41);
    for (side, whole_words) in [(28, true), (6, true), (5, false)] {
        let count = 5;
        let images: Vec<u8> = (0..count * side * side)
            .map(|_| (rng.next_f32() * 256.0) as u8)
            .collect();
        let dataset = Dataset {
            images,
            labels: (0..count as u8).map(|l| 9 - l).collect(),
            height: side,
            width: side,
        };
        let order = [3u32, 0, 4, 4, 1, 2];
        let device_data = GpuDataset::upload(&gpu, &dataset).unwrap();
        let mut g = Graph::new(false);
        let px = g.external("pixels", vec![count, side, side], DType::U8);
        let labels = g.external("labels", vec![count], DType::U32);
        let indices = g.input(vec![order.len()], DType::U32);
        let out = g
            .apply(GatherResize { size: side }, &[px, labels, indices])
            .unwrap();
        let mut externals = Externals::new();
        device_data.bind(&mut externals);
        let store = ParamStore::new(&gpu, &g).unwrap();
        let plan = Plan::new(&gpu, &g, &store, &externals).unwrap();
        plan.write_u32(&gpu, indices, &order);
        plan.run(&gpu);
        let case = format!("{side}x{side}");
        assert_eq!(
            plan.entry_points().contains(&"gather"),
            whole_words,
            "{case}: {:?}",
            plan.entry_points()
        );
        let want: Vec<f32> = (order.iter())
            .flat_map(|&i| dataset.image(i as usize).iter().map(|&b| b as f32 / 255.0))
            .collect();
        let images = plan.read_f32(&gpu, &g, out[0]).unwrap();
        assert_close(&format!("{case} images"), &images, &want, 0.0, 0.0);
        let want_labels: Vec<u32> = order.iter().map(|&i| 9 - i).collect();
        assert_eq!(
            plan.read_u32(&gpu, &g, out[1]).unwrap(),
            want_labels,
            "{case} labels"
        );
    }
}

/// Three steps of a torch.optim optimizer with the golden file's gradients,
/// on the GPU (state in GPU buffers) and with the CPU reference.
fn check_optimizer(file: &str, optimizer: Optimizer) {
    let gpu = gpu();
    let gold = Golden::load(&format!("ops/{file}.safetensors"));
    let before = gold.f32("param_before");
    let mut g = Graph::new(true);
    g.param("w".into(), before.shape.clone(), Init::Zeros);
    let store = ParamStore::new(&gpu, &g).unwrap();
    let floats = (store.bytes / 4) as usize;
    let grads = g.external("gradients", vec![floats], DType::F32);
    let params = g.external("parameters", vec![floats], DType::F32);
    OptimizerState::add_step(optimizer, &mut g, grads, params);
    let state = OptimizerState::new(&gpu, optimizer, &store).unwrap();
    let mut externals = Externals::new();
    externals.insert("parameters", d2l_wgpu::graph::Binding::whole(&store.values));
    externals.insert("gradients", d2l_wgpu::graph::Binding::whole(&store.grads));
    state.bind(&mut externals);
    let plan = Plan::new(&gpu, &g, &store, &externals).unwrap();
    store.write(&gpu, 0, &before.data).unwrap();
    let mut cpu = before.data.clone();
    let mut cpu_state = vec![vec![0.0; cpu.len()]; optimizer.state_names().len()];
    for step in 1..=3 {
        let grad = gold.f32(&format!("grad_{step}"));
        gpu.queue
            .write_buffer(&store.grads, 0, bytemuck::cast_slice(&grad.data));
        plan.run(&gpu);
        let want = gold.f32(&format!("param_after_{step}"));
        assert_op_close(
            &format!("{file} step {step}"),
            &store.read(&gpu, 0).unwrap(),
            &want.data,
        );
        optimizer.cpu(&mut cpu, &grad.data, &mut cpu_state, step);
        assert_op_close(&format!("{file} cpu step {step}"), &cpu, &want.data);
    }
}

fn meta_f32(file: &str, key: &str) -> f32 {
    Golden::load(&format!("ops/{file}.safetensors"))
        .meta(key)
        .parse()
        .unwrap()
}

/// `torch.optim.SGD(lr=0.1)`: d2l's optimizer.
#[test]
fn sgd_matches_pytorch() {
    check_optimizer("optim_sgd", Optimizer::sgd(meta_f32("optim_sgd", "lr")));
}

/// `torch.optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.001)`.
#[test]
fn sgd_with_momentum_and_weight_decay_matches_pytorch() {
    let file = "optim_sgd_momentum_wd";
    let optimizer = Optimizer::Sgd {
        lr: meta_f32(file, "lr"),
        momentum: meta_f32(file, "momentum"),
        weight_decay: meta_f32(file, "weight_decay"),
    };
    check_optimizer(file, optimizer);
}

/// `torch.optim.Adam(lr=0.002)` with betas (0.9, 0.999) and eps 1e-8.
#[test]
fn adam_matches_pytorch() {
    let file = "optim_adam";
    let gold = Golden::load(&format!("ops/{file}.safetensors"));
    assert_eq!(gold.meta("betas"), "[0.9, 0.999]");
    assert_eq!(meta_f32(file, "eps"), 1e-8);
    check_optimizer(file, Optimizer::adam(meta_f32(file, "lr"), 0.0));
}

/// `act(F.conv2d(x, w, b))` and `act(F.linear(x, w, b))` with ReLU and
/// sigmoid, on both kernel families: the executor fuses the activation into
/// the kernel's epilogue, so the pre-activation tensor gets no memory; when
/// another node also reads the pre-activation (`act(p) + p`) it must not.
/// Outputs and every gradient against the CPU references.
#[test]
fn activations_fuse_into_conv_and_linear() {
    let mut gpu = gpu();
    let mut rng = Rng::new(23);
    let conv = Conv2d {
        stride: (2, 1),
        padding: (1, 1),
    };
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for activation in [Activation::Relu, Activation::Sigmoid] {
            for also_read in [false, true] {
                let case =
                    format!("{kernel:?} {activation:?}, pre-activation also read: {also_read}");
                let (x, w, b) = (
                    random(&[2, 3, 7, 9], &mut rng),
                    random(&[5, 3, 3, 3], &mut rng),
                    random(&[5], &mut rng),
                );
                let pre = conv.cpu_forward(&x, &w, &b.data);
                let dy = random(&pre.shape, &mut rng);
                let dpre = activation_then(activation, also_read, &pre, &dy);
                let (dx, dw, db) = conv.cpu_backward(&x, &w, &dpre.1);
                let r = run_activated(&gpu, conv, (activation, also_read), &[&x, &w, &b], &dy);
                check_activated(
                    &format!("conv {case}"),
                    &r,
                    &dpre.0,
                    [&dx.data, &dw.data, &db],
                );

                let (x, w, b) = (
                    random(&[3, 7], &mut rng),
                    random(&[5, 7], &mut rng),
                    random(&[5], &mut rng),
                );
                let pre = Linear::cpu_forward(&x, &w, &b.data);
                let dy = random(&pre.shape, &mut rng);
                let dpre = activation_then(activation, also_read, &pre, &dy);
                let (dx, dw, db) = Linear::cpu_backward(&x, &w, &dpre.1);
                let r = run_activated(&gpu, Linear, (activation, also_read), &[&x, &w, &b], &dy);
                check_activated(
                    &format!("linear {case}"),
                    &r,
                    &dpre.0,
                    [&dx.data, &dw.data, &db],
                );
            }
        }
    }
}

/// The CPU output `act(pre)` (plus `pre` when `also_read`) and the gradient
/// reaching `pre` from `dy`.
fn activation_then(
    activation: Activation,
    also_read: bool,
    pre: &CpuTensor,
    dy: &CpuTensor,
) -> (CpuTensor, CpuTensor) {
    let mut y = activation.cpu_forward(pre);
    let mut dpre = activation.cpu_backward(&y, dy);
    if also_read {
        for (i, v) in pre.data.iter().enumerate() {
            y.data[i] += v;
            dpre.data[i] += dy.data[i];
        }
    }
    (y, dpre)
}

/// Asserts that the tensors fusion left without memory take `bytes`: in a
/// `Graph::new` plan every other tensor has a buffer of its own.
fn assert_elided(plan: &Plan, bytes: u64, what: &str) {
    let unallocated = plan.unshared_activation_bytes - plan.activation_bytes;
    assert_eq!(unallocated, bytes, "{what}: bytes left without memory");
}

struct Activated {
    result: common::OpResult,
    /// Activation bytes a buffer per tensor would take, less those planned.
    unallocated: u64,
    pre_activation_bytes: u64,
    also_read: bool,
}

fn run_activated(
    gpu: &Gpu,
    op: impl Op + 'static,
    (activation, also_read): (Activation, bool),
    inputs: &[&CpuTensor],
    dy: &CpuTensor,
) -> Activated {
    let mut g = Graph::new(true);
    let ids: Vec<_> = (inputs.iter().enumerate())
        .map(|(i, t)| g.param(format!("input{i}"), t.shape.clone(), Init::Zeros))
        .collect();
    let pre = g.apply1(op, &ids).unwrap();
    let mut y = g.apply1(activation, &[pre]).unwrap();
    if also_read {
        y = g.apply1(d2l_wgpu::ops::Add, &[y, pre]).unwrap();
    }
    let dy_id = g.input(dy.shape.clone(), DType::F32);
    autodiff::backward(&mut g, &[(y, dy_id)]).unwrap();
    let store = ParamStore::new(gpu, &g).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        store.write(gpu, i, &t.data).unwrap();
    }
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(gpu, &g, dy_id, &dy.data).unwrap();
    plan.run(gpu);
    Activated {
        result: common::OpResult {
            output: plan.read_f32(gpu, &g, y).unwrap(),
            input_grads: (0..inputs.len())
                .map(|i| store.read_grad(gpu, i).unwrap())
                .collect(),
            entry_points: plan.entry_points(),
        },
        unallocated: plan.unshared_activation_bytes - plan.activation_bytes,
        pre_activation_bytes: g.tensor(pre).bytes(),
        also_read,
    }
}

fn check_activated(case: &str, r: &Activated, y: &CpuTensor, grads: [&[f32]; 3]) {
    assert_op_close(&format!("{case} y"), &r.result.output, &y.data);
    for (name, (got, want)) in ["dx", "dweight", "dbias"]
        .iter()
        .zip(r.result.input_grads.iter().zip(grads))
    {
        assert_op_close(&format!("{case} {name}"), got, want);
    }
    // Graph::new keeps a buffer per tensor: only an elided tensor has none.
    let elided = if r.also_read {
        0
    } else {
        r.pre_activation_bytes
    };
    assert_eq!(
        r.unallocated, elided,
        "{case}: bytes of activations left unallocated"
    );
}

/// `act(a + b)` (ResNet's `relu(y + shortcut)`) with ReLU and sigmoid, on
/// planes of whole vec4s (4 x 4) and not (5 x 7): the activation runs in the
/// sum's kernel, so the sum gets no memory; the output and both gradients
/// against the CPU references.
#[test]
fn activations_fuse_into_add() {
    let gpu = gpu();
    let mut rng = Rng::new(47);
    for shape in [[2, 3, 4, 4], [2, 3, 5, 7]] {
        for activation in [Activation::Relu, Activation::Sigmoid] {
            let (a, b) = (random(&shape, &mut rng), random(&shape, &mut rng));
            let sum = CpuTensor::new(
                &shape,
                a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect(),
            );
            let dy = random(&shape, &mut rng);
            let (y, dsum) = activation_then(activation, false, &sum, &dy);
            let mut g = Graph::new(true);
            let (a_id, b_id) = (g.leaf(shape.to_vec()), g.leaf(shape.to_vec()));
            let sum_id = g.apply1(d2l_wgpu::ops::Add, &[a_id, b_id]).unwrap();
            let y_id = g.apply1(activation, &[sum_id]).unwrap();
            let dy_id = g.input(shape.to_vec(), DType::F32);
            let grads = autodiff::backward(&mut g, &[(y_id, dy_id)]).unwrap();
            let store = ParamStore::new(&gpu, &g).unwrap();
            let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
            for (id, t) in [(a_id, &a), (b_id, &b), (dy_id, &dy)] {
                plan.write_f32(&gpu, &g, id, &t.data).unwrap();
            }
            plan.run(&gpu);
            let case = format!("add {shape:?} + {activation:?}");
            let got = plan.read_f32(&gpu, &g, y_id).unwrap();
            assert_op_close(&format!("{case} y"), &got, &y.data);
            let got = plan.read_f32(&gpu, &g, grads[&a_id]).unwrap();
            assert_op_close(&format!("{case} gradient"), &got, &dsum.data);
            assert_elided(
                &plan,
                4 * sum.data.len() as u64,
                &format!("{case}: the sum"),
            );
        }
    }
}

/// `y = act(x)` read twice (`y` itself and `y + other`): its gradient is
/// the sum of the two, which the activation's backward reads alone, so one
/// pass adds them and carries the sum through the backward (ResNet's block
/// outputs); ReLU and sigmoid, vec4 and scalar paths; dx against the CPU
/// and the sum elided.
#[test]
fn activation_backward_fuses_into_gradient_sums() {
    let gpu = gpu();
    let mut rng = Rng::new(59);
    for shape in [[2, 3, 4, 4], [2, 3, 5, 7]] {
        for activation in [Activation::Relu, Activation::Sigmoid] {
            let (x, other) = (random(&shape, &mut rng), random(&shape, &mut rng));
            let (dy, dsum) = (random(&shape, &mut rng), random(&shape, &mut rng));
            let y = activation.cpu_forward(&x);
            let total = CpuTensor::new(
                &shape,
                dy.data.iter().zip(&dsum.data).map(|(a, b)| a + b).collect(),
            );
            let dx = activation.cpu_backward(&y, &total);
            let mut g = Graph::new(true);
            let (x_id, other_id) = (g.leaf(shape.to_vec()), g.leaf(shape.to_vec()));
            let y_id = g.apply1(activation, &[x_id]).unwrap();
            let sum_id = g.apply1(d2l_wgpu::ops::Add, &[y_id, other_id]).unwrap();
            let (dy_id, dsum_id) = (
                g.input(shape.to_vec(), DType::F32),
                g.input(shape.to_vec(), DType::F32),
            );
            let grads = autodiff::backward(&mut g, &[(y_id, dy_id), (sum_id, dsum_id)]).unwrap();
            let store = ParamStore::new(&gpu, &g).unwrap();
            let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
            for (id, t) in [
                (x_id, &x),
                (other_id, &other),
                (dy_id, &dy),
                (dsum_id, &dsum),
            ] {
                plan.write_f32(&gpu, &g, id, &t.data).unwrap();
            }
            plan.run(&gpu);
            let case = format!("{shape:?} {activation:?}");
            let got = plan.read_f32(&gpu, &g, grads[&x_id]).unwrap();
            assert_op_close(&format!("{case} dx"), &got, &dx.data);
            assert_elided(&plan, 4 * x.data.len() as u64, &format!("{case}: the sum"));
        }
    }
}

/// `act(F.batch_norm(x, ...))` for ReLU and sigmoid, training and eval: the
/// activation runs in batch norm's normalising pass (the pre-activation gets
/// no memory), and outputs and gradients match the CPU references.
#[test]
fn activations_fuse_into_batch_norm() {
    let gpu = gpu();
    let mut rng = Rng::new(31);
    for shape in [vec![3, 4], vec![2, 5, 3, 7], vec![2, 3, 4, 4]] {
        for activation in [Activation::Relu, Activation::Sigmoid] {
            let c = shape[1];
            let x = random(&shape, &mut rng);
            let [gamma, beta, rm, rv] = random_norm_parameters(c, &mut rng);
            let dy = random(&shape, &mut rng);
            let r = run_batch_norm(&gpu, (&x, Some(activation)), &gamma, &beta, (&rm, &rv), &dy);

            let norm = BatchNorm::new(true);
            let cpu = norm.cpu_train(&x, &gamma, &beta, (&rm, &rv));
            let y = activation.cpu_forward(&cpu.y);
            let (dx, dgamma, dbeta) =
                norm.cpu_backward(&x, &gamma, &activation.cpu_backward(&y, &dy));
            let running = (&cpu.running_mean[..], &cpu.running_var[..]);
            let y_eval = activation.cpu_forward(&norm.cpu_eval(&x, &gamma, &beta, running));
            let case = format!("batch norm {shape:?} + {activation:?}");
            assert_op_close(&format!("{case} y"), &r.y, &y.data);
            assert_op_close(&format!("{case} dx"), &r.dx, &dx.data);
            assert_op_close(&format!("{case} dgamma"), &r.dgamma, &dgamma);
            assert_op_close(&format!("{case} dbeta"), &r.dbeta, &dbeta);
            assert_op_close(&format!("{case} y_eval"), &r.y_eval, &y_eval.data);
            assert_eq!(
                r.unallocated,
                4 * x.data.len() as u64,
                "{case}: the pre-activation is not elided"
            );
        }
    }
}

/// DenseNet's `cat(x, f(relu(batch_norm(x))))`: batch norm reads a
/// concatenated branch, and the concatenation's node comes after f. The
/// branch is written before batch norm runs, so the ReLU still runs in
/// batch norm's pass (the pre-activation gets no memory); y against the CPU.
#[test]
fn activations_fuse_into_batch_norm_of_a_concatenated_branch() {
    let gpu = gpu();
    let mut rng = Rng::new(59);
    let shape = [2, 3, 4, 4];
    let c = shape[1];
    let x = random(&shape, &mut rng);
    let [gamma, beta, rm, rv] = random_norm_parameters(c, &mut rng);
    let norm = BatchNorm::new(true);
    let y = Activation::Relu.cpu_forward(&norm.cpu_train(&x, &gamma, &beta, (&rm, &rv)).y);

    let mut g = Graph::new(true);
    let x0_id = g.leaf(shape.to_vec());
    // x an op's output: a concatenation takes only those.
    let x_id = g.apply1(AvgPool2d::new(1, 1), &[x0_id]).unwrap();
    let gamma_id = g.param("weight".into(), vec![c], Init::Zeros);
    let beta_id = g.param("bias".into(), vec![c], Init::Zeros);
    let mean = g.state("running_mean".into(), vec![c], Init::Zeros);
    let var = g.state("running_var".into(), vec![c], Init::Ones);
    let pre = g
        .apply1(norm, &[x_id, gamma_id, beta_id, mean, var])
        .unwrap();
    let y_id = g.apply1(Activation::Relu, &[pre]).unwrap();
    let branch = g.apply1(AvgPool2d::new(1, 1), &[y_id]).unwrap();
    g.concat(&[x_id, branch]).unwrap();
    let store = ParamStore::new(&gpu, &g).unwrap();
    store.write(&gpu, 0, &gamma).unwrap();
    store.write(&gpu, 1, &beta).unwrap();
    let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
    plan.write_f32(&gpu, &g, x0_id, &x.data).unwrap();
    plan.run(&gpu);
    let got = plan.read_f32(&gpu, &g, y_id).unwrap();
    assert_op_close(
        "batch norm of a concatenated branch + relu: y",
        &got,
        &y.data,
    );
    assert_elided(
        &plan,
        4 * x.data.len() as u64,
        "batch norm's pre-activation",
    );
}

/// `pool(act(x))` with average and max pooling, ReLU and sigmoid: the
/// activation's backward runs inside the pooling gradient's kernel (the
/// gradient at the activation's output gets no memory); dx against the CPU.
/// With 3 x 2 windows rows of 9 take the per-element kernels, rows of 8 the
/// four-at-a-time ones; 2 x 2 windows tile 6 x 8 planes (two windows per
/// invocation, `*_2x2_pairs`) and 6 x 10 ones (`*_2x2`) but not 7 x 9 ones.
#[test]
fn activation_backward_fuses_into_pool_gradients() {
    let gpu = gpu();
    let mut rng = Rng::new(37);
    let overlapping = PoolWindow {
        kernel: (3, 2),
        stride: (2, 2),
        padding: (1, 1),
    };
    let activations = [Activation::Relu, Activation::Sigmoid];
    let windows = [overlapping, PoolWindow::new(2, 2)];
    let cases = activations.into_iter().flat_map(|a| {
        windows.into_iter().flat_map(move |w| {
            [[2, 3, 7, 9], [2, 3, 6, 8], [2, 3, 6, 10], [2, 3, 7, 8]].map(|s| (a, w, s))
        })
    });
    for (activation, window, shape) in cases {
        for max in [false, true] {
            let pool_kind = if max { "max" } else { "avg" };
            let case = format!("{activation:?} then {pool_kind} pool {window:?} on {shape:?}");
            let x = random(&shape, &mut rng);
            let y = activation.cpu_forward(&x);
            let mut g = Graph::new(true);
            let xi = g.leaf(x.shape.clone());
            let yi = g.apply1(activation, &[xi]).unwrap();
            let (pooled, dy_y) = if max {
                let pool = MaxPool2d(window);
                let (pooled, argmax) = pool.cpu_forward(&y);
                let dy = random(&pooled.shape, &mut rng);
                let dy_y = pool.cpu_backward(&x.shape, &dy, &argmax);
                (g.apply(pool, &[yi]).unwrap()[0], (dy, dy_y))
            } else {
                let pool = AvgPool2d(window);
                let dy = random(&pool.cpu_forward(&y).shape, &mut rng);
                let dy_y = pool.cpu_backward(&x.shape, &dy);
                (g.apply1(pool, &[yi]).unwrap(), (dy, dy_y))
            };
            let (dy, dy_y) = dy_y;
            let dy_id = g.input(dy.shape.clone(), DType::F32);
            let grads = autodiff::backward(&mut g, &[(pooled, dy_id)]).unwrap();
            let store = ParamStore::new(&gpu, &g).unwrap();
            let plan = Plan::new(&gpu, &g, &store, &Externals::new()).unwrap();
            plan.write_f32(&gpu, &g, xi, &x.data).unwrap();
            plan.write_f32(&gpu, &g, dy_id, &dy.data).unwrap();
            plan.run(&gpu);
            let dx = plan.read_f32(&gpu, &g, grads[&xi]).unwrap();
            assert_op_close(
                &format!("{case} dx"),
                &dx,
                &activation.cpu_backward(&y, &dy_y).data,
            );
            let tiles = window == PoolWindow::new(2, 2) && shape[2] % 2 == 0;
            let window_kernel = match (tiles, shape[3] % 4) {
                (true, 0) => vec![format!("{pool_kind}_backward_activated_2x2_pairs")],
                (true, _) => vec![format!("{pool_kind}_backward_activated_2x2")],
                _ => vec![],
            };
            let taken: Vec<String> = (plan.entry_points().iter())
                .filter(|e| e.contains("_backward_activated_2x2"))
                .map(|e| e.to_string())
                .collect();
            assert_eq!(
                taken,
                window_kernel,
                "{case}: kernels {:?}",
                plan.entry_points()
            );
            let what = format!("{case}: the gradient at y");
            assert_elided(&plan, 4 * x.data.len() as u64, &what);
        }
    }
}

/// Where the tensors around a fused data gradient live.
#[derive(Clone, Copy, Debug)]
enum FusedLayout {
    /// Each in a buffer of its own.
    Plain,
    /// The activation's output is a channel slice of a concatenation, after
    /// three other channels.
    OutputSliced,
    /// The gradient at the activation's input is a channel slice
    /// (`ParallelConv2d` concatenates its outputs' gradients), before
    /// three other channels.
    GradientSliced,
    /// Both, at different offsets with the same sample stride: the
    /// gradient before the other three channels, the output after them.
    BothSliced,
}

/// `conv2d(act(conv2d(x, w1, b1)), w2, b2)` (the first convolution 1x1)
/// with ReLU and sigmoid: the second convolution's data gradient carries
/// its result on through the activation's backward as it stores (no
/// elementwise backward runs), so the gradient at the activation's output
/// gets no memory; every gradient against the CPU references. The second
/// convolution takes each data-gradient kernel: the gathering one with
/// scalar stores (a 7 x 9 plane) and vec4 stores, the row kernel (at most 8
/// input channels, rows of 12), pointwise reads, four phases of stride 2,
/// and a 1x1 stride-2 kernel that leaves three phases zero; with the
/// activation's output or the gradient a channel slice of a concatenation
/// (a different sample stride from the other's); every kernel family.
#[test]
fn activation_backward_fuses_into_conv_data_gradients() {
    let mut gpu = gpu();
    let mut rng = Rng::new(41);
    let cases: [FusedCase; 6] = [
        ([2, 3, 7, 9], 5, [7, 3, 1]),
        ([1, 2, 10, 16], 9, [6, 5, 1]),
        ([2, 3, 12, 12], 6, [5, 3, 1]),
        ([2, 3, 6, 6], 20, [9, 1, 1]),
        ([3, 3, 9, 8], 5, [4, 3, 2]),
        ([2, 3, 8, 8], 12, [5, 1, 2]),
    ];
    let layouts = [
        FusedLayout::Plain,
        FusedLayout::OutputSliced,
        FusedLayout::GradientSliced,
        FusedLayout::BothSliced,
    ];
    let activations = [Activation::Relu, Activation::Sigmoid];
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for (i, case) in cases.into_iter().enumerate() {
            for (j, layout) in layouts.into_iter().enumerate() {
                let fused = (activations[(i + j) % 2], layout);
                let what = format!("{kernel:?}");
                let entries = check_fused_data_gradient(&gpu, case, fused, &mut rng, &what);
                // Only the other convolution's, whose gradient is a seed.
                let on_its_own = match layout {
                    FusedLayout::GradientSliced | FusedLayout::BothSliced => 1,
                    _ => 0,
                };
                assert_eq!(
                    unfused_activation_backward(&entries),
                    on_its_own,
                    "{what} {case:?} {layout:?}: {entries:?}"
                );
                let fused = match (kernel, i) {
                    (GemmKernel::Strided, _) => "backward_data",
                    (_, 2) => "conv_rows",
                    _ => "conv_transposed",
                };
                assert!(
                    entries.contains(&fused),
                    "{what} {case:?}: {fused} did not run: {entries:?}"
                );
            }
        }
    }
    // In batch chunks: under a 5,000-byte binding limit the activations (2 KB
    // a sample, more where they are slices) bind one or two samples at a time.
    gpu.tuning.binding_limit = 5_000;
    for kernel in gemm_kernels(&gpu) {
        gpu.tuning.gemm = kernel;
        for (j, layout) in layouts.into_iter().enumerate() {
            let case = ([5, 1, 8, 8], 8, [5, 3, 1]);
            let fused = (activations[j % 2], layout);
            let what = format!("{kernel:?} in batch chunks");
            let entries = check_fused_data_gradient(&gpu, case, fused, &mut rng, &what);
            let data_gradient = match kernel {
                GemmKernel::Strided => "backward_data",
                _ => "conv_transposed",
            };
            // Two data gradients, each once per chunk.
            assert!(
                entries.iter().filter(|e| **e == data_gradient).count() >= 6,
                "{what} {layout:?}: {entries:?}"
            );
            if let FusedLayout::Plain | FusedLayout::OutputSliced = layout {
                assert_eq!(unfused_activation_backward(&entries), 0, "{what}");
            }
        }
    }
}

/// x, the activation's channels, the second convolution's (out channels,
/// kernel, stride).
type FusedCase = ([usize; 4], usize, [usize; 3]);

/// Runs one case of `activation_backward_fuses_into_conv_data_gradients`
/// against the CPU references; returns the entry points the plan ran.
fn check_fused_data_gradient(
    gpu: &Gpu,
    (xs, mid, [out, k, stride]): FusedCase,
    (activation, layout): (Activation, FusedLayout),
    rng: &mut Rng,
    what: &str,
) -> Vec<&'static str> {
    let case = format!(
        "{what} {layout:?} x{xs:?} -> {mid} + {activation:?} -> {k}x{k} stride {stride} into {out}"
    );
    let conv2 = Conv2d {
        stride: (stride, stride),
        padding: (k / 2, k / 2),
    };
    // x, w1, b1, w2, b2, and the other 1x1 convolution's weight and bias.
    let inputs = [
        random(&xs, rng),
        random(&[mid, xs[1], 1, 1], rng),
        random(&[mid], rng),
        random(&[out, mid, k, k], rng),
        random(&[out], rng),
        random(&[3, xs[1], 1, 1], rng),
        random(&[3], rng),
    ];
    let [x, w1, b1, w2, b2, w3, b3] = &inputs;
    let pointwise = Conv2d {
        stride: (1, 1),
        padding: (0, 0),
    };
    let a = activation.cpu_forward(&pointwise.cpu_forward(x, w1, &b1.data));
    let y = conv2.cpu_forward(&a, w2, &b2.data);
    let dy = random(&y.shape, rng);
    let (da, dw2, db2) = conv2.cpu_backward(&a, w2, &dy);
    let (mut dx, dw1, db1) = pointwise.cpu_backward(x, w1, &activation.cpu_backward(&a, &da));
    // With ParallelConv2d the other convolution's output gets a gradient too.
    let other = activation.cpu_forward(&pointwise.cpu_forward(x, w3, &b3.data));
    let d_other = random(&other.shape, rng);
    let (dx_other, dw3, db3) =
        pointwise.cpu_backward(x, w3, &activation.cpu_backward(&other, &d_other));

    let mut g = Graph::new(true);
    let ids: Vec<_> = (inputs.iter().enumerate())
        .map(|(i, t)| g.param(format!("input{i}"), t.shape.clone(), Init::Zeros))
        .collect();
    let mut seeds = Vec::new();
    let a_id = match layout {
        FusedLayout::Plain | FusedLayout::OutputSliced => {
            let pre = g.apply1(pointwise, &ids[..3]).unwrap();
            let a_id = g.apply1(activation, &[pre]).unwrap();
            if let FusedLayout::OutputSliced = layout {
                let other = g.apply1(pointwise, &[ids[0], ids[5], ids[6]]).unwrap();
                g.concat(&[other, a_id]).unwrap();
            }
            a_id
        }
        FusedLayout::GradientSliced | FusedLayout::BothSliced => {
            let op = ParallelConv2d {
                conv: pointwise,
                activation,
            };
            let parallel = [ids[0], ids[1], ids[2], ids[5], ids[6]];
            let outputs = g.apply(op, &parallel).unwrap();
            if let FusedLayout::BothSliced = layout {
                g.concat(&[outputs[1], outputs[0]]).unwrap();
            }
            seeds.push((outputs[1], g.input(d_other.shape.clone(), DType::F32)));
            outputs[0]
        }
    };
    let y_id = g.apply1(conv2, &[a_id, ids[3], ids[4]]).unwrap();
    seeds.insert(0, (y_id, g.input(dy.shape.clone(), DType::F32)));
    autodiff::backward(&mut g, &seeds).unwrap();
    let store = ParamStore::new(gpu, &g).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        store.write(gpu, i, &t.data).unwrap();
    }
    let plan = Plan::new(gpu, &g, &store, &Externals::new()).unwrap();
    for (&(_, id), seed) in seeds.iter().zip([&dy, &d_other]) {
        plan.write_f32(gpu, &g, id, &seed.data).unwrap();
    }
    plan.run(gpu);
    assert_op_close(
        &format!("{case} y"),
        &plan.read_f32(gpu, &g, y_id).unwrap(),
        &y.data,
    );
    let mut want = vec![(3, &dw2.data), (4, &db2)];
    if let FusedLayout::GradientSliced | FusedLayout::BothSliced = layout {
        for (sum, v) in dx.data.iter_mut().zip(&dx_other.data) {
            *sum += v;
        }
        want.extend([(5, &dw3.data), (6, &db3)]);
    }
    want.extend([(0, &dx.data), (1, &dw1.data), (2, &db1)]);
    for (i, want) in want {
        let got = store.read_grad(gpu, i).unwrap();
        assert_op_close(&format!("{case} gradient of input {i}"), &got, want);
    }
    plan.entry_points()
}

/// Dispatches of an activation's backward on its own among `entries`.
fn unfused_activation_backward(entries: &[&str]) -> usize {
    let unfused = [
        "relu_backward",
        "sigmoid_backward",
        "activation_backward_quads",
    ];
    entries.iter().filter(|e| unfused.contains(e)).count()
}
