//! Datasets: the IDX reader and Fashion-MNIST (60,000 training and 10,000
//! test images of 28x28 grey pixels, 10 classes).

pub mod idx;

use anyhow::{bail, Result};
use idx::{read_idx, IMAGES_MAGIC, LABELS_MAGIC};
use std::path::{Path, PathBuf};

pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Images as u8 `[count, height, width]` with one label (0..10) each.
#[derive(Clone)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.height * self.width;
        &self.images[i * size..(i + 1) * size]
    }

    /// The first `n` examples (all of them when `n` is larger).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.height * self.width);
    }

    /// Reads an images file and its labels file and checks they belong together.
    pub fn load(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
        let images = read_idx(images_path, IMAGES_MAGIC)?;
        let labels = read_idx(labels_path, LABELS_MAGIC)?;
        let (count, height, width) = (images.dims[0], images.dims[1], images.dims[2]);
        if count != labels.dims[0] {
            bail!(
                "{} has {count} images but {} has {} labels",
                images_path.display(),
                labels_path.display(),
                labels.dims[0]
            );
        }
        if count == 0 || height == 0 || width == 0 {
            bail!(
                "{}: the dataset is empty ({count} images of {height}x{width})",
                images_path.display()
            );
        }
        if let Some(i) = labels
            .data
            .iter()
            .position(|&l| l as usize >= CLASSES.len())
        {
            bail!(
                "{}: label {} at index {i} is out of range (expected 0..{})",
                labels_path.display(),
                labels.data[i],
                CLASSES.len() - 1
            );
        }
        Ok(Dataset {
            images: images.data,
            labels: labels.data,
            height,
            width,
        })
    }
}

pub struct FashionMnist {
    pub train: Dataset,
    pub test: Dataset,
}

impl FashionMnist {
    /// The project's own copy, found from the working directory or the source tree.
    pub fn default_dir() -> PathBuf {
        let local = PathBuf::from("assets/fashion-mnist");
        if local.is_dir() {
            local
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fashion-mnist")
        }
    }

    /// Reads the four standard files (`train-images-idx3-ubyte.gz`, ...) from `dir`.
    pub fn load(dir: &Path) -> Result<FashionMnist> {
        let train = Dataset::load(
            &dir.join("train-images-idx3-ubyte.gz"),
            &dir.join("train-labels-idx1-ubyte.gz"),
        )?;
        let test = FashionMnist::load_test(dir)?;
        if (train.height, train.width) != (test.height, test.width) {
            bail!(
                "{}: training images are {}x{} but test images are {}x{}",
                dir.display(),
                train.height,
                train.width,
                test.height,
                test.width
            );
        }
        Ok(FashionMnist { train, test })
    }

    /// The test set only (`t10k-*`).
    pub fn load_test(dir: &Path) -> Result<Dataset> {
        Dataset::load(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            &dir.join("t10k-labels-idx1-ubyte.gz"),
        )
    }
}
