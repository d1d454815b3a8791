//! What a training run shows and leaves behind: progress lines or none,
//! the training-curve and confusion-matrix figures, and metrics files that
//! survive a run killed mid-epoch.

mod common;

use common::{arg, cli, cli_ok, kill_after_first_write, scratch_dir};
use std::path::Path;
use std::time::Duration;

const SMALL_RUN: [&str; 10] = [
    "--model",
    "lenet-bn",
    "--limit-train",
    "320",
    "--limit-test",
    "64",
    "--batch-size",
    "32",
    "--lr",
    "0.5",
];

/// Without a terminal, progress is ten plain lines per epoch (one per
/// tenth of the batches); `--quiet` leaves only the epoch lines.
#[test]
fn progress_lines_without_a_terminal_and_none_when_quiet() {
    let text = cli_ok(&[&SMALL_RUN[..], &["--epochs", "1"]].concat());
    let progress: Vec<&str> = text.lines().filter(|l| l.starts_with("  batch ")).collect();
    assert_eq!(progress.len(), 10, "{text}");
    assert!(progress[9].starts_with("  batch 10/10, loss "), "{text}");
    assert!(progress[9].ends_with(" examples/sec"), "{text}");
    assert!(text.contains("epoch 1, loss "), "{text}");
    // Each line's rate counts the time since the epoch began, the first too.
    let rate = |line: &str| -> f64 {
        let before = line.split(" examples/sec").next().unwrap();
        before.rsplit(", ").next().unwrap().parse().unwrap()
    };
    let epoch_line = text.lines().find(|l| l.starts_with("epoch 1")).unwrap();
    for line in &progress {
        assert!(
            rate(line) > 0.0 && rate(line) < 10.0 * rate(epoch_line),
            "{line} against {epoch_line}"
        );
    }

    let quiet = cli_ok(&[&SMALL_RUN[..], &["--epochs", "1", "--quiet"]].concat());
    let lines: Vec<&str> = quiet.lines().collect();
    assert_eq!(lines.len(), 2, "{quiet}");
    assert!(lines[1].starts_with("epoch 1, loss "), "{quiet}");
}

/// Counts pixels close to `colour`.
fn pixels_of(image: &image::RgbImage, colour: [u8; 3]) -> usize {
    image
        .pixels()
        .filter(|p| p.0.iter().zip(colour).all(|(a, b)| a.abs_diff(b) < 40))
        .count()
}

/// `--plot` draws the three curves of d2l's figure as PNG and SVG;
/// `eval --confusion` draws the matrix.
#[test]
fn plots_show_the_curves_and_the_confusion_matrix() {
    let dir = scratch_dir("figures");
    let (png, svg, checkpoint) = (
        dir.join("curves.png"),
        dir.join("curves.svg"),
        dir.join("run.safetensors"),
    );
    for (plot, save) in [(&png, Some(&checkpoint)), (&svg, None)] {
        let mut args = [
            &SMALL_RUN[..],
            &["--epochs", "2", "--quiet", "--plot", arg(plot)],
        ]
        .concat();
        if let Some(save) = save {
            args.extend(["--save", arg(save)]);
        }
        cli_ok(&args);
    }
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (640, 440));
    // Blue train loss, magenta train acc, green test acc.
    for colour in [[31, 119, 180], [191, 0, 191], [0, 128, 0]] {
        assert!(pixels_of(&image, colour) > 200, "{colour:?} curve missing");
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{text}");
    for label in ["train loss", "train acc", "test acc", "epoch"] {
        assert!(text.contains(label), "{label} missing from the SVG");
    }

    let confusion = dir.join("confusion.png");
    cli_ok(&[
        "eval",
        "--checkpoint",
        arg(&checkpoint),
        "--limit-test",
        "64",
        "--confusion",
        arg(&confusion),
    ]);
    let image = image::open(&confusion).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (860, 860));
    assert!(pixels_of(&image, [38, 38, 255]) > 0 || pixels_of(&image, [120, 120, 255]) > 0);

    let out = cli(&[&SMALL_RUN[..], &["--plot", "curves.pdf"]].concat());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--plot curves.pdf: the file name must end in .png or .svg"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The data rows of a metrics CSV.
fn csv_rows(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// A run killed in the middle of its second epoch leaves a metrics file
/// that parses and holds exactly the finished epoch.
#[test]
fn a_run_killed_mid_epoch_keeps_its_finished_epochs() {
    let dir = scratch_dir("killed");
    let (csv, json) = (dir.join("m.csv"), dir.join("m.json"));
    for metrics in [&csv, &json] {
        let args = [
            "--model",
            "lenet",
            "--epochs",
            "50",
            "--limit-train",
            "4000",
            "--limit-test",
            "100",
            "--batch-size",
            "64",
            "--metrics",
            arg(metrics),
        ];
        // Epoch 2 takes seconds: kill it a quarter of a second in.
        let printed = kill_after_first_write(&args, metrics, Duration::from_millis(250));
        let finished = printed.lines().filter(|l| l.starts_with("epoch ")).count();
        assert_eq!(finished, 1, "{printed}");
        if metrics == &csv {
            let rows = csv_rows(metrics);
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].len(), 7);
            assert_eq!(rows[0][0], 1.0);
        } else {
            let text = std::fs::read_to_string(metrics).unwrap();
            let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(rows.as_array().unwrap().len(), 1, "{text}");
            assert_eq!(rows[0]["epoch"], 1);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
