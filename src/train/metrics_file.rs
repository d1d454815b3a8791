//! `--metrics FILE.csv|FILE.json`: one row per finished epoch, rewritten
//! atomically after every epoch so an interrupted run leaves a valid file.

use super::atomic::write_atomic;
use super::EpochReport;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
}

pub struct MetricsFile {
    path: PathBuf,
    format: Format,
}

const COLUMNS: [&str; 7] = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "examples_per_sec",
    "seconds",
];

fn values(r: &EpochReport) -> [String; 7] {
    [
        r.epoch.to_string(),
        format!("{:.6}", r.train_loss),
        format!("{:.6}", r.train_acc),
        format!("{:.6}", r.test_loss),
        format!("{:.6}", r.test_acc),
        format!("{:.1}", r.examples_per_sec),
        format!("{:.3}", r.seconds),
    ]
}

impl MetricsFile {
    /// The format comes from the extension: `.csv` or `.json`.
    pub fn new(path: &Path) -> Result<MetricsFile> {
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Format::Csv,
            Some("json") => Format::Json,
            _ => bail!(
                "--metrics {}: the file name must end in .csv or .json",
                path.display()
            ),
        };
        Ok(MetricsFile {
            path: path.to_path_buf(),
            format,
        })
    }

    fn render(&self, reports: &[EpochReport]) -> String {
        match self.format {
            Format::Csv => {
                let mut text = COLUMNS.join(",") + "\n";
                for r in reports {
                    text += &(values(r).join(",") + "\n");
                }
                text
            }
            Format::Json => {
                let rows: Vec<String> = reports
                    .iter()
                    .map(|r| {
                        let fields: Vec<String> = COLUMNS
                            .iter()
                            .zip(values(r))
                            .map(|(k, v)| format!("\"{k}\": {v}"))
                            .collect();
                        format!("  {{{}}}", fields.join(", "))
                    })
                    .collect();
                format!("[\n{}\n]\n", rows.join(",\n"))
            }
        }
    }

    /// Replaces the file with all rows so far, atomically.
    pub fn write(&self, reports: &[EpochReport]) -> Result<()> {
        write_atomic(&self.path, self.render(reports).as_bytes())
            .with_context(|| format!("writing metrics to {}", self.path.display()))
    }
}
