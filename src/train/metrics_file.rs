//! `--metrics FILE.csv|FILE.json`: one row per finished epoch, rewritten
//! atomically after every epoch so an interrupted run leaves a valid file.

use super::EpochReport;
use anyhow::{bail, Context, Result};
use std::io::Write;
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

    /// Replaces the file with all rows so far: written to a temporary file
    /// in the same folder, synced, then renamed over the old one.
    pub fn write(&self, reports: &[EpochReport]) -> Result<()> {
        let name = self
            .path
            .file_name()
            .context("--metrics needs a file name")?;
        let temporary = self
            .path
            .with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(self.render(reports).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)
        };
        write().with_context(|| format!("writing metrics to {}", self.path.display()))
    }
}
