//! `d2l-wgpu predict`: a checkpoint's most likely classes for image files
//! or test-set images. Files of any size and colour become 28x28 grey
//! images like Fashion-MNIST's, then take the training input path (GPU
//! gather, scale to [0, 1], bilinear resize).

use super::{load_weights, param_store, GpuDataset};
use crate::data::{Dataset, FashionMnist, CLASSES};
use crate::gpu::Gpu;
use crate::graph::{Binding, DType, Externals, Graph, Plan};
use crate::models::{self, ModelSpec};
use crate::nn::Module;
use crate::ops::GatherResize;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Fashion-MNIST's image side.
const SIDE: usize = 28;

/// Images per planned forward pass.
const BATCH: usize = 32;

pub enum ImageSource {
    File(PathBuf),
    TestIndex(usize),
}

pub struct Prediction {
    /// The file name or `test image N`.
    pub source: String,
    /// The true class, for test-set images.
    pub label: Option<usize>,
    /// (class, probability), most likely first.
    pub top: Vec<(usize, f32)>,
}

/// An image file as a 28x28 grey image (luma of colour images, bilinear
/// resampling).
pub fn load_image(path: &Path) -> Result<Vec<u8>> {
    let image = image::ImageReader::open(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("{} is not a PNG or JPEG image", path.display()))?;
    let grey = image.to_luma8();
    let side = SIDE as u32;
    Ok(
        image::imageops::resize(&grey, side, side, image::imageops::FilterType::Triangle)
            .into_raw(),
    )
}

pub struct PredictConfig {
    pub model: &'static ModelSpec,
    pub resize: usize,
    pub data_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub top: usize,
}

pub fn predict(gpu: &Gpu, cfg: &PredictConfig, sources: &[ImageSource]) -> Result<Vec<Prediction>> {
    if sources.is_empty() {
        bail!("give at least one image file or --index N");
    }
    models::check_resize(cfg.model, cfg.resize)?;
    let mut images = Dataset {
        images: Vec::new(),
        labels: Vec::new(),
        height: SIDE,
        width: SIDE,
    };
    let mut described = Vec::new();
    let needs_test_set = sources
        .iter()
        .any(|s| matches!(s, ImageSource::TestIndex(_)));
    let test = needs_test_set
        .then(|| FashionMnist::load_test(&cfg.data_dir))
        .transpose()?;
    for source in sources {
        match source {
            ImageSource::File(path) => {
                images.images.extend(load_image(path)?);
                images.labels.push(0);
                described.push((path.display().to_string(), None));
            }
            ImageSource::TestIndex(i) => {
                let test = test.as_ref().expect("loaded above");
                if *i >= test.len() {
                    bail!(
                        "--index {i}: the test set has {} images (0 to {})",
                        test.len(),
                        test.len() - 1
                    );
                }
                images.images.extend(test.image(*i));
                images.labels.push(test.labels[*i]);
                described.push((format!("test image {i}"), Some(test.labels[*i] as usize)));
            }
        }
    }
    let data = GpuDataset::upload(gpu, &images)?;
    let model = (cfg.model.build)();
    let params = param_store(gpu, &model, &data, cfg.resize)?;
    load_weights(gpu, &params, &cfg.checkpoint, cfg.model)?;

    let mut logits = Vec::new();
    let order: Vec<u32> = (0..images.len() as u32).collect();
    for batch in order.chunks(BATCH) {
        let mut g = Graph::new(false);
        let pixels = g.external("pixels", vec![data.len, SIDE, SIDE], DType::U8);
        let labels = g.external("labels", vec![data.len], DType::U32);
        let indices = g.external("indices", vec![batch.len()], DType::U32);
        let x = g.apply(
            GatherResize { size: cfg.resize },
            &[pixels, labels, indices],
        )?[0];
        let out = model.forward(&mut g, x, "")?;
        let index_buffer = gpu.storage_buffer("image indices", 4 * batch.len() as u64)?;
        gpu.queue
            .write_buffer(&index_buffer, 0, bytemuck::cast_slice(batch));
        let mut externals = Externals::new();
        data.bind(&mut externals);
        externals.insert("indices", Binding::whole(&index_buffer));
        let plan = Plan::new(gpu, &g, &params, &externals)?;
        plan.run(gpu);
        logits.extend(plan.read_f32(gpu, &g, out)?);
    }
    Ok(described
        .into_iter()
        .zip(logits.chunks(CLASSES.len()))
        .map(|((source, label), row)| Prediction {
            source,
            label,
            top: top_classes(row, cfg.top),
        })
        .collect())
}

/// Softmax of one row of logits, the `k` most likely classes first.
fn top_classes(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    let mut classes: Vec<(usize, f32)> = exps
        .iter()
        .enumerate()
        .map(|(c, e)| (c, (e / sum) as f32))
        .collect();
    classes.sort_by(|a, b| b.1.total_cmp(&a.1));
    classes.truncate(k);
    classes
}
