//! Figures: d2l's Animator plot of a training run (train loss, train acc
//! and test acc against epoch) and the confusion matrix of an evaluation,
//! as PNG or SVG. Text is drawn with the DejaVu Sans font shipped in
//! `assets/fonts`, so no system fonts are needed.

use super::atomic::write_atomic;
use super::EpochReport;
use crate::data::CLASSES;
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Png,
    Svg,
}

fn format_of(path: &Path, flag: &str) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        _ => bail!(
            "{flag} {}: the file name must end in .png or .svg",
            path.display()
        ),
    }
}

/// Checks a figure path's extension before any work starts.
pub fn check_path(path: &Path, flag: &str) -> Result<()> {
    format_of(path, flag).map(|_| ())
}

/// One curve's values from the per-epoch reports.
type Column = fn(&EpochReport) -> f64;

/// A figure drawn by the same code on the bitmap and the SVG backend.
trait Figure {
    const SIZE: (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Draws `figure` and writes it atomically as PNG or SVG.
fn render<F: Figure>(path: &Path, flag: &str, figure: &F) -> Result<()> {
    let size = F::SIZE;
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled font is a valid TrueType file"));
    });
    let bytes = match format_of(path, flag)? {
        Format::Png => {
            let mut pixels = vec![255u8; (size.0 * size.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
                figure.draw(&root)?;
                root.present().map_err(plot_error)?;
            }
            let image = image::RgbImage::from_raw(size.0, size.1, pixels)
                .expect("the buffer holds width x height RGB pixels");
            let mut png = Vec::new();
            image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .with_context(|| format!("encoding {}", path.display()))?;
            png
        }
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                figure.draw(&root)?;
                root.present().map_err(plot_error)?;
            }
            svg.into_bytes()
        }
    };
    write_atomic(path, &bytes)
}

fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing the figure: {e:?}")
}

/// d2l's Animator figure after the epochs in `reports`, with the x axis
/// spanning all `epochs` of the run.
pub fn training_curves(
    path: &Path,
    title: &str,
    reports: &[EpochReport],
    epochs: usize,
) -> Result<()> {
    render(
        path,
        "--plot",
        &Curves {
            title,
            reports,
            epochs,
        },
    )
}

struct Curves<'a> {
    title: &'a str,
    reports: &'a [EpochReport],
    epochs: usize,
}

impl Figure for Curves<'_> {
    const SIZE: (u32, u32) = (640, 440);

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let Curves {
            title,
            reports,
            epochs,
        } = *self;
        root.fill(&WHITE).map_err(plot_error)?;
        let top = reports.iter().map(|r| r.train_loss).fold(1.0f64, f64::max) * 1.05;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(1f64..epochs.max(2) as f64, 0f64..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(epochs.clamp(2, 11))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_error)?;
        let series: [(&str, RGBColor, Column); 3] = [
            ("train loss", RGBColor(31, 119, 180), |r| r.train_loss),
            ("train acc", RGBColor(191, 0, 191), |r| r.train_acc),
            ("test acc", RGBColor(0, 128, 0), |r| r.test_acc),
        ];
        for (name, colour, value) in series {
            let points: Vec<(f64, f64)> =
                reports.iter().map(|r| (r.epoch as f64, value(r))).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, colour.filled())),
                )
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_error)?;
        Ok(())
    }
}

/// `confusion[label][prediction]` as a grid of counts shaded by each true
/// class's share, class names on both axes.
pub fn confusion_matrix(path: &Path, title: &str, confusion: &[Vec<u32>]) -> Result<()> {
    render(path, "--confusion", &Confusion { title, confusion })
}

struct Confusion<'a> {
    title: &'a str,
    confusion: &'a [Vec<u32>],
}

impl Figure for Confusion<'_> {
    const SIZE: (u32, u32) = (860, 860);

    /// Drawn on pixel coordinates: a 10x10 grid of 72-pixel cells, class
    /// names to the left (true class) and below (prediction), row 0 on top
    /// as in the printed matrix.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        const LEFT: i32 = 110;
        const TOP: i32 = 70;
        const CELL: i32 = 72;
        let centred = |size: u32, colour: &RGBColor| {
            ("sans-serif", size)
                .into_font()
                .color(colour)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        let text = |s: String, at: (i32, i32), style: TextStyle| {
            root.draw(&Text::new(s, at, style)).map_err(plot_error)
        };
        root.fill(&WHITE).map_err(plot_error)?;
        text(self.title.to_string(), (430, 20), centred(18, &BLACK))?;
        text(
            "rows: true class, columns: predicted class, shaded by each row's share".into(),
            (430, 46),
            centred(13, &BLACK),
        )?;
        let grid = CELL * CLASSES.len() as i32;
        for (i, name) in CLASSES.iter().enumerate() {
            let middle = CELL * i as i32 + CELL / 2;
            let right_aligned = ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center));
            text(name.to_string(), (LEFT - 8, TOP + middle), right_aligned)?;
            text(
                name.to_string(),
                (LEFT + middle, TOP + grid + 14),
                centred(11, &BLACK),
            )?;
        }
        for (label, row) in self.confusion.iter().enumerate() {
            let seen = row.iter().sum::<u32>().max(1);
            for (prediction, &count) in row.iter().enumerate() {
                let share = f64::from(count) / f64::from(seen);
                let (x, y) = (LEFT + CELL * prediction as i32, TOP + CELL * label as i32);
                let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL, y + CELL)],
                    RGBColor(shade, shade, 255).filled(),
                ))
                .map_err(plot_error)?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                text(
                    count.to_string(),
                    (x + CELL / 2, y + CELL / 2),
                    centred(14, &ink),
                )?;
            }
        }
        root.draw(&Rectangle::new(
            [(LEFT, TOP), (LEFT + grid, TOP + grid)],
            BLACK.mix(0.4),
        ))
        .map_err(plot_error)?;
        Ok(())
    }
}
