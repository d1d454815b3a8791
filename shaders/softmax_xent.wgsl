// Softmax cross-entropy (nn.CrossEntropyLoss, mean over the batch) with its
// gradient in the same pass, and the per-epoch metric accumulation.

struct Xent {
    batch: u32,
    classes: u32,
    grad_scale: f32, // 1 / batch: the mean's derivative
    _pad: u32,
}

struct Metrics {
    loss_sum: f32,
    correct: u32,
    seen: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Xent;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> correct: array<u32>;
@group(0) @binding(5) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(6) var<storage, read_write> metrics: Metrics;

struct RowStats {
    max_value: f32,
    argmax: u32,
    log_sum_exp: f32,
}

fn row_stats(row: u32) -> RowStats {
    let base = row * p.classes;
    var m = logits[base];
    var arg = 0u;
    for (var c = 1u; c < p.classes; c++) {
        // Strictly greater: ties go to the first index, as torch.argmax.
        if (logits[base + c] > m) {
            m = logits[base + c];
            arg = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < p.classes; c++) {
        sum += exp(logits[base + c] - m);
    }
    return RowStats(m, arg, m + log(sum));
}

fn loss_and_accuracy(row: u32) -> RowStats {
    let stats = row_stats(row);
    let label = labels[row];
    loss[row] = stats.log_sum_exp - logits[row * p.classes + label];
    correct[row] = u32(stats.argmax == label);
    return stats;
}

// One invocation per sample: loss, correctness and dlogits = (softmax - onehot) / batch.
@compute @workgroup_size(WG)
fn forward_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_index(gid, nwg);
    if (row >= p.batch) {
        return;
    }
    let stats = loss_and_accuracy(row);
    let label = labels[row];
    let base = row * p.classes;
    for (var c = 0u; c < p.classes; c++) {
        let prob = exp(logits[base + c] - stats.log_sum_exp);
        dlogits[base + c] = (prob - select(0.0, 1.0, c == label)) * p.grad_scale;
    }
}

// Evaluation: loss and correctness only.
@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_index(gid, nwg);
    if (row < p.batch) {
        loss_and_accuracy(row);
    }
}

const REDUCE_WG: u32 = 64u;
var<workgroup> loss_part: array<f32, REDUCE_WG>;
var<workgroup> correct_part: array<u32, REDUCE_WG>;

// One workgroup adds the batch's loss and correct count to the running
// metrics with a fixed-order tree, so the sums are reproducible.
@compute @workgroup_size(REDUCE_WG)
fn accumulate(@builtin(local_invocation_index) t: u32) {
    var l = 0.0;
    var c = 0u;
    for (var i = t; i < p.batch; i += REDUCE_WG) {
        l += loss[i];
        c += correct[i];
    }
    loss_part[t] = l;
    correct_part[t] = c;
    workgroupBarrier();
    for (var half = REDUCE_WG / 2u; half > 0u; half /= 2u) {
        if (t < half) {
            loss_part[t] += loss_part[t + half];
            correct_part[t] += correct_part[t + half];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        metrics.loss_sum += loss_part[0];
        metrics.correct += correct_part[0];
        metrics.seen += p.batch;
    }
}

@group(0) @binding(7) var<storage, read_write> confusion: array<u32>; // [label][prediction]

// One invocation adds the batch to the confusion matrix, in row order.
@compute @workgroup_size(1)
fn confusion_counts() {
    for (var row = 0u; row < p.batch; row++) {
        let cell = labels[row] * p.classes + row_stats(row).argmax;
        confusion[cell] += 1u;
    }
}
