//! The command line as a user runs it.

mod common;

use common::{cli as d2l_wgpu, refused, stdout};

/// One epoch of LeNet on 1,000 training images (63 batches of 16): the loss
/// over the last batches is well below the loss over the first ones, and the
/// epoch ends with d2l's line.
#[test]
fn lenet_trains_one_epoch_and_the_loss_falls() {
    let out = d2l_wgpu(&[
        "--model",
        "lenet",
        "--epochs",
        "1",
        "--limit-train",
        "1000",
        "--limit-test",
        "500",
        "--batch-size",
        "16",
        "--log-every",
        "12",
    ]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let losses: Vec<f64> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("batch "))
        .map(|l| {
            l.split("loss ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6, "{text}");
    assert!(losses.iter().all(|l| l.is_finite()), "{text}");
    assert!(
        losses[0] > losses[losses.len() - 1] + 0.3,
        "the loss should fall: {losses:?}"
    );
    let epoch = text
        .lines()
        .find(|l| l.starts_with("epoch 1, loss "))
        .expect("epoch line");
    assert!(
        epoch.contains("train acc")
            && epoch.contains("test acc")
            && epoch.contains("examples/sec on"),
        "{epoch}"
    );
}

#[test]
fn unknown_model_is_refused_with_the_choices() {
    let (err, _) = refused(&["--model", "transformer"]);
    assert!(
        err.contains("unknown model \"transformer\"") && err.contains("lenet"),
        "{err}"
    );
}

#[test]
fn devices_lists_an_adapter() {
    let out = d2l_wgpu(&["devices"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("max storage buffer binding"), "{text}");
}

/// `bench --profile`: the step's rates, then each op's GPU time with its
/// rate as a share of the SGEMM rate timed just before and after it, which
/// lies between the slowest and the fastest SGEMM of the profile.
#[test]
fn bench_profile_puts_each_op_beside_sgemm() {
    let out = d2l_wgpu(&[
        "bench",
        "--model",
        "lenet",
        "--batch-size",
        "32",
        "--steps",
        "2",
        "--profile",
        "--top",
        "4",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("training step: "), "{text}");
    let sgemm: Vec<f64> = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "SGEMM meanwhile (A^T B 1024x1024x1024, timed before and after each op with FLOPs): ",
            )
        })
        .map(|rest| {
            rest.replace(" GFLOP/s median,", "")
                .replace(" to", "")
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .unwrap_or_else(|| panic!("no SGEMM line: {text}"));
    let [median, slowest, fastest] = sgemm[..] else {
        panic!("SGEMM line: {sgemm:?}")
    };
    assert!(slowest <= median && median <= fastest, "{sgemm:?}");
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("x conv2d")).collect();
    assert!(!rows.is_empty(), "{text}");
    for row in rows {
        // ms, share, GFLOP/s, of SGEMM, then the op. Rates are printed to
        // 0.1 GFLOP/s, the share to 1%.
        let fields: Vec<&str> = row.split_whitespace().collect();
        let gflops: f64 = fields[2].parse().unwrap();
        let share: f64 = fields[3].trim_end_matches('%').parse().unwrap();
        let lowest = 100.0 * (gflops - 0.05) / (fastest + 0.05) - 0.5;
        let highest = 100.0 * (gflops + 0.05) / (slowest - 0.05) + 0.5;
        assert!(
            lowest <= share && share <= highest,
            "{row}: {gflops} GFLOP/s is not {share}% of a rate from {slowest} to {fastest}"
        );
    }
}

/// Impossible settings are refused before any data is read or GPU work
/// starts, with exit code 2 and a message naming the allowed values.
#[test]
fn impossible_settings_are_refused_up_front() {
    let cases: [(&[&str], &str); 13] = [
        (
            &["--metrics", "out.txt"],
            "--metrics out.txt: the file name must end in .csv or .json",
        ),
        (&["--batch-size", "0"], "--batch-size must be at least 1"),
        (&["--lr", "-1"], "--lr must be a positive number, got -1"),
        (&["--epochs", "0"], "--epochs must be at least 1"),
        (&["--dropout", "1"], "--dropout must be in [0, 1), got 1"),
        (&["--limit-train", "0"], "--limit-train must be at least 1"),
        (&["--momentum", "1"], "--momentum must be in [0, 1), got 1"),
        (
            &["--weight-decay", "-0.1"],
            "--weight-decay must be 0 or more, got -0.1",
        ),
        (
            &["--optimizer", "adam", "--momentum", "0.9"],
            "--momentum is for --optimizer sgd",
        ),
        (
            &["--init", "no/such.safetensors"],
            "--init no/such.safetensors: no such file",
        ),
        (
            &["--save", "no/such/run.safetensors"],
            "--save no/such/run.safetensors: the folder no/such does not exist",
        ),
        (
            &["--init", "Cargo.toml", "--resume", "Cargo.toml"],
            "--init and --resume exclude each other",
        ),
        (
            &["--resize", "8"],
            "--resize 8 is too small for lenet: it takes sizes from 12 (d2l uses 28)",
        ),
    ];
    for (args, message) in cases {
        let (err, _) = refused(
            &[
                &[
                    "--model",
                    "lenet",
                    "--backend",
                    "gl",
                    "--adapter",
                    "no such adapter",
                ],
                args,
            ]
            .concat(),
        );
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

#[test]
fn a_batch_larger_than_the_dataset_is_refused() {
    let (err, _) = refused(&[
        "--model",
        "lenet",
        "--limit-train",
        "100",
        "--batch-size",
        "256",
    ]);
    assert!(
        err.contains("--batch-size 256 is larger than the 100 training images"),
        "{err}"
    );
}

/// `--metrics` files hold one parseable row per finished epoch, matching
/// the printed epoch lines.
#[test]
fn metrics_files_hold_one_row_per_epoch() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["m.csv", "m.json"] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let out = d2l_wgpu(&[
            "--epochs",
            "2",
            "--limit-train",
            "300",
            "--limit-test",
            "100",
            "--batch-size",
            "100",
            "--metrics",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Vec<String> = stdout(&out)
            .lines()
            .filter(|l| l.starts_with("epoch "))
            .map(|l| {
                l.split("loss ")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let text = std::fs::read_to_string(&path).unwrap();
        let losses: Vec<f64> = if name.ends_with(".csv") {
            let mut lines = text.lines();
            assert_eq!(
                lines.next(),
                Some("epoch,train_loss,train_acc,test_loss,test_acc,examples_per_sec,seconds")
            );
            lines
                .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
                .collect()
        } else {
            let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
            rows.as_array()
                .unwrap()
                .iter()
                .map(|r| r["train_loss"].as_f64().unwrap())
                .collect()
        };
        assert_eq!(losses.len(), 2, "{name}: {text}");
        for (loss, shown) in losses.iter().zip(&printed) {
            assert_eq!(format!("{loss:.3}"), *shown, "{name}");
        }
    }
}

/// A loss that turns non-finite stops training within 50 steps (even with
/// no progress reports to read the loss), naming the epoch and step and
/// suggesting a lower learning rate.
#[test]
fn divergence_stops_training_early() {
    let (err, out) = refused(&[
        "--lr",
        "3e38",
        "--epochs",
        "1",
        "--limit-train",
        "3000",
        "--limit-test",
        "100",
        "--batch-size",
        "16",
        "--quiet",
    ]);
    assert!(
        err.contains("epoch 1: training diverged; try a lower --lr"),
        "{err}"
    );
    assert!(
        err.contains("the training loss became NaN by step 50 of 188"),
        "{err}"
    );
    assert!(
        !out.contains("epoch 1, loss"),
        "no epoch line after divergence"
    );
}
