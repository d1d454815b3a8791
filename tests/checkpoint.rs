//! Checkpoints through the command line: a resumed run gives the
//! uninterrupted run's numbers, `eval` and `predict` read what `train`
//! saved, and files that do not fit are refused with what is wrong.

mod common;

use common::{arg, cli_ok, kill_after_first_write, refused, scratch_dir};
use d2l_wgpu::data::FashionMnist;
use d2l_wgpu::train::checkpoint::{sidecar_path, StoredTensor, TensorFile};
use std::path::Path;

/// LeNet on 256 training and 300 test images, batches of 32.
const LENET_RUN: [&str; 9] = [
    "train",
    "--model",
    "lenet",
    "--limit-train",
    "256",
    "--limit-test",
    "300",
    "--batch-size",
    "32",
];

/// Trains LeNet for one epoch and saves it to `dir/lenet.safetensors`.
fn trained_lenet(dir: &Path) -> std::path::PathBuf {
    let checkpoint = dir.join("lenet.safetensors");
    let metrics = dir.join("lenet.csv");
    let more = [
        "--epochs",
        "1",
        "--save",
        arg(&checkpoint),
        "--metrics",
        arg(&metrics),
    ];
    cli_ok(&[&LENET_RUN[..], &more].concat());
    checkpoint
}

/// The loss and accuracy columns of a metrics CSV, as text.
fn metric_rows(csv: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(5).map(String::from).collect())
        .collect()
}

/// Two epochs straight, against one epoch, save, and `--resume` for the
/// second: the same per-epoch metrics and the same tensors, bit for bit, in
/// the weights and in the training state (optimizer state, step counts,
/// random streams).
fn check_resume(name: &str, optimizer: &[&str]) {
    let dir = scratch_dir(name);
    let run = |epochs: &str, ckpt: &str, resume: bool| {
        let ckpt = dir.join(ckpt);
        let metrics = ckpt.with_extension("csv");
        let mut args = vec![
            "train",
            "--model",
            "lenet-bn",
            "--limit-train",
            "640",
            "--limit-test",
            "128",
            "--batch-size",
            "64",
            "--seed",
            "3",
            "--epochs",
            epochs,
            "--save",
            arg(&ckpt),
            "--metrics",
            arg(&metrics),
        ];
        if resume {
            args.extend(["--resume", arg(&ckpt)]);
        }
        args.extend(optimizer);
        cli_ok(&args)
    };
    run("2", "straight.safetensors", false);
    run("1", "split.safetensors", false);
    let resumed = run("2", "split.safetensors", true);
    assert!(
        resumed.contains("split.safetensors after epoch 1\n"),
        "{resumed}"
    );
    assert!(!resumed.contains("epoch 1, loss"), "{resumed}");

    let straight = metric_rows(&dir.join("straight.csv"));
    assert_eq!(straight.len(), 2);
    assert_eq!(straight, metric_rows(&dir.join("split.csv")));
    for file in ["straight.safetensors", "split.safetensors"] {
        assert_eq!(
            TensorFile::read(&dir.join(file)).unwrap().meta("epoch"),
            Some("2")
        );
    }
    let tensors = |p: &Path| TensorFile::read(p).unwrap().tensors;
    let (a, b) = (
        dir.join("straight.safetensors"),
        dir.join("split.safetensors"),
    );
    assert_eq!(tensors(&a), tensors(&b), "weights");
    assert_eq!(
        tensors(&sidecar_path(&a)),
        tensors(&sidecar_path(&b)),
        "training state"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_sgd_with_momentum_matches_the_uninterrupted_run() {
    check_resume(
        "resume-sgd",
        &["--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4"],
    );
}

#[test]
fn resuming_adam_matches_the_uninterrupted_run() {
    check_resume("resume-adam", &["--optimizer", "adam", "--lr", "0.002"]);
}

/// `eval` on the saved weights gives the accuracy the training run printed
/// for its last epoch, and a confusion matrix that counts every test image.
#[test]
fn eval_reports_the_accuracy_training_saw() {
    let dir = scratch_dir("eval");
    let checkpoint = trained_lenet(&dir);
    let text = cli_ok(&[
        "eval",
        "--checkpoint",
        arg(&checkpoint),
        "--limit-test",
        "300",
    ]);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("lenet at 28x28 on 300 test images"),
        "{first}"
    );
    let accuracy: f64 = first.split("accuracy ").nth(1).unwrap().parse().unwrap();
    let trained: f64 = metric_rows(&dir.join("lenet.csv"))[0][4].parse().unwrap();
    assert!((accuracy - trained).abs() < 1e-4, "{accuracy} vs {trained}");

    let matrix: Vec<Vec<u32>> = text
        .lines()
        .skip_while(|l| !l.starts_with("confusion matrix"))
        .skip(2)
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[words.len() - 10..]
                .iter()
                .map(|w| w.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(matrix.len(), 10, "{text}");
    assert_eq!(matrix.iter().flatten().sum::<u32>(), 300);
    let correct: u32 = (0..10).map(|c| matrix[c][c]).sum();
    assert!((f64::from(correct) / 300.0 - accuracy).abs() < 1e-4);
    assert!(text.contains("Ankle boot"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The probabilities lines of each image block of `predict`'s output.
fn prediction_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with("  ") {
            blocks.last_mut().unwrap().push(line.to_string());
        } else {
            blocks.push(Vec::new());
        }
    }
    blocks
}

/// `predict` on test image 0 by index, as a 28x28 grey PNG of the same
/// pixels, and as an 84x84 colour JPEG of it: the same top-3 for the first
/// two (identical pixels) and the same best class for the third.
#[test]
fn predict_reads_test_images_and_image_files() {
    let dir = scratch_dir("predict");
    let checkpoint = trained_lenet(&dir);
    let test = FashionMnist::load_test(&FashionMnist::default_dir()).unwrap();
    let grey = image::GrayImage::from_raw(28, 28, test.image(0).to_vec()).unwrap();
    let png = dir.join("first.png");
    grey.save(&png).unwrap();
    let colour = image::RgbImage::from_fn(84, 84, |x, y| {
        let v = grey.get_pixel(x / 3, y / 3).0[0];
        image::Rgb([v, v, v])
    });
    let jpeg = dir.join("first.jpg");
    colour.save(&jpeg).unwrap();

    let text = cli_ok(&[
        "predict",
        "--checkpoint",
        arg(&checkpoint),
        arg(&png),
        arg(&jpeg),
        "--index",
        "0",
    ]);
    assert!(
        text.contains("test image 0 (true class: Ankle boot):"),
        "{text}"
    );
    let blocks = prediction_blocks(&text);
    assert_eq!(blocks.len(), 3, "{text}");
    assert!(blocks.iter().all(|b| b.len() == 3), "{text}");
    assert_eq!(blocks[0], blocks[2], "PNG and --index 0 differ");
    let best = |b: &[String]| b[0].split_whitespace().next().unwrap().to_string();
    assert_eq!(best(&blocks[1]), best(&blocks[2]), "{text}");

    let (err, _) = refused(&[
        "predict",
        "--checkpoint",
        arg(&checkpoint),
        "--index",
        "10000",
    ]);
    assert!(
        err.contains("--index 10000: the test set has 10000 images"),
        "{err}"
    );
    let (err, _) = refused(&[
        "predict",
        "--checkpoint",
        arg(&checkpoint),
        arg(&dir.join("lenet.csv")),
    ]);
    assert!(
        err.contains("lenet.csv is not a PNG or JPEG image"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint that does not fit the model lists the missing keys, the
/// unexpected keys and the shape mismatches; one for another model says
/// which; truncated and missing files are named.
#[test]
fn checkpoints_that_do_not_fit_are_refused() {
    let dir = scratch_dir("mismatch");
    let checkpoint = trained_lenet(&dir);
    let ckpt = arg(&checkpoint);

    let mut bad = TensorFile::read(&checkpoint).unwrap();
    bad.metadata.clear();
    bad.tensors.remove("0.weight");
    bad.tensors
        .insert("fc.weight".into(), StoredTensor::f32(&[2], &[0.0, 0.0]));
    bad.tensors
        .insert("3.bias".into(), StoredTensor::f32(&[15], &[0.0; 15]));
    let bad_path = dir.join("bad.safetensors");
    bad.write_atomic(&bad_path).unwrap();
    for command in ["eval", "predict"] {
        let mut args = vec![command, "--model", "lenet", "--checkpoint", arg(&bad_path)];
        if command == "predict" {
            args.extend(["--index", "0"]);
        }
        let (err, _) = refused(&args);
        assert!(
            err.contains("bad.safetensors does not fit the model"),
            "{err}"
        );
        assert!(err.contains("missing keys: 0.weight"), "{err}");
        assert!(err.contains("unexpected keys: fc.weight"), "{err}");
        assert!(
            err.contains("shape mismatch: 3.bias: the file has F32 [15], the model needs F32 [16]"),
            "{err}"
        );
    }
    let (err, _) = refused(&[
        "train",
        "--model",
        "lenet",
        "--init",
        arg(&bad_path),
        "--epochs",
        "1",
    ]);
    assert!(err.contains("missing keys: 0.weight"), "{err}");

    let (err, _) = refused(&["eval", "--model", "lenet-bn", "--checkpoint", ckpt]);
    assert!(
        err.contains("holds a lenet checkpoint, not lenet-bn; pass --model lenet"),
        "{err}"
    );
    let (err, _) = refused(&["eval", "--checkpoint", arg(&bad_path)]);
    assert!(
        err.contains("does not say which model it holds; pass --model"),
        "{err}"
    );

    let bytes = std::fs::read(&checkpoint).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (err, _) = refused(&["eval", "--checkpoint", arg(&truncated)]);
    assert!(
        err.contains("truncated.safetensors is not a valid safetensors file"),
        "{err}"
    );
    let (err, _) = refused(&["eval", "--checkpoint", arg(&dir.join("none.safetensors"))]);
    assert!(err.contains("cannot read"), "{err}");
    assert!(err.contains("none.safetensors"), "{err}");

    std::fs::remove_file(sidecar_path(&checkpoint)).unwrap();
    let (err, _) = refused(&[
        "train", "--model", "lenet", "--resume", ckpt, "--epochs", "2",
    ]);
    assert!(err.contains("--resume needs the training state"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Training that diverges stops before its epoch's save: the last good
/// checkpoint and its training state stay as they were, byte for byte.
#[test]
fn divergence_leaves_the_last_good_checkpoint_untouched() {
    let dir = scratch_dir("diverge");
    let checkpoint = trained_lenet(&dir);
    let before = (
        std::fs::read(&checkpoint).unwrap(),
        std::fs::read(sidecar_path(&checkpoint)).unwrap(),
    );
    let ckpt = arg(&checkpoint);
    let more = [
        "--resume", ckpt, "--save", ckpt, "--epochs", "2", "--lr", "3e38",
    ];
    let (err, _) = refused(&[&LENET_RUN[..], &more].concat());
    assert!(err.contains("epoch 2: training diverged"), "{err}");
    let after = (
        std::fs::read(&checkpoint).unwrap(),
        std::fs::read(sidecar_path(&checkpoint)).unwrap(),
    );
    assert!(before == after, "the checkpoint changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Killing a run at any moment, saves included, leaves a checkpoint that
/// reads completely: every save goes to a temporary file that is renamed
/// over the previous one only once it is whole. LeNet on 64 images saves
/// several times a second; six runs are killed at staggered moments.
#[test]
fn a_run_killed_while_saving_leaves_a_valid_checkpoint() {
    let dir = scratch_dir("killed-save");
    let checkpoint = dir.join("run.safetensors");
    for round in 0..6u64 {
        let args = [
            "train",
            "--model",
            "lenet",
            "--epochs",
            "1000",
            "--limit-train",
            "64",
            "--limit-test",
            "64",
            "--batch-size",
            "64",
            "--quiet",
            "--save",
            arg(&checkpoint),
        ];
        let then = std::time::Duration::from_millis(150 + 37 * round);
        kill_after_first_write(&args, &checkpoint, then);
        let file = TensorFile::read(&checkpoint).unwrap();
        assert_eq!(file.tensors.len(), 10, "round {round}");
        TensorFile::read(&sidecar_path(&checkpoint)).unwrap();
        if round < 5 {
            std::fs::remove_file(&checkpoint).unwrap();
        }
    }
    // The next complete save clears what killed saves left behind.
    cli_ok(
        &[
            &LENET_RUN[..],
            &["--epochs", "1", "--save", arg(&checkpoint)],
        ]
        .concat(),
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
