//! What a training run shows while an epoch runs: a progress bar when
//! stdout is a terminal, plain lines when it is not, nothing when quiet.
//! The d2l epoch line is printed in every mode.

use super::{Progress, Reporting};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    Bar,
    Lines,
    Quiet,
}

impl Display {
    /// A bar on a terminal, lines otherwise; `quiet` wins.
    pub fn for_stdout(quiet: bool) -> Display {
        if quiet {
            Display::Quiet
        } else if std::io::stdout().is_terminal() {
            Display::Bar
        } else {
            Display::Lines
        }
    }

    /// How often to read the loss: every `log_every` batches when given,
    /// else often enough to keep a bar moving, or ten lines an epoch.
    pub fn reporting(self, log_every: usize) -> Reporting {
        match (self, log_every) {
            (Display::Quiet, _) => Reporting::Off,
            (_, n) if n > 0 => Reporting::EveryBatches(n),
            (Display::Bar, _) => Reporting::PerEpoch(20),
            (Display::Lines, _) => Reporting::PerEpoch(10),
        }
    }
}

pub struct ProgressDisplay {
    display: Display,
    bar: Option<ProgressBar>,
    epoch: usize,
}

impl ProgressDisplay {
    pub fn new(display: Display) -> ProgressDisplay {
        ProgressDisplay {
            display,
            bar: None,
            epoch: 0,
        }
    }

    pub fn step(&mut self, p: &Progress) {
        if p.epoch != self.epoch {
            self.epoch = p.epoch;
            self.bar = (self.display == Display::Bar).then(|| new_bar(p));
        }
        let per_sec = p.examples_done as f64 / p.seconds;
        match (&self.bar, &p.figures) {
            (Some(bar), figures) => {
                bar.set_position(p.batches_done as u64);
                if let Some(f) = figures {
                    bar.set_message(format!(
                        ", loss {:.3}, train acc {:.3}, {per_sec:.1} examples/sec",
                        f.epoch_loss, f.epoch_acc
                    ));
                }
            }
            (None, Some(f)) if self.display == Display::Lines => println!(
                "  batch {}/{}, loss {:.3}, train acc {:.3}, {per_sec:.1} examples/sec",
                p.batches_done, p.batches, f.recent_loss, f.recent_acc
            ),
            _ => {}
        }
    }

    /// Clears the bar and prints the epoch's line.
    pub fn epoch_line(&mut self, line: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        println!("{line}");
    }
}

fn new_bar(p: &Progress) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(p.batches as u64), ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template(&format!(
        "epoch {} [{{bar:30}}] {{pos}}/{{len}} batches{{msg}}, ETA {{eta}}",
        p.epoch
    ))
    .expect("the template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}
