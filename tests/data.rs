//! The IDX reader and the Fashion-MNIST loader: the real files load, and
//! each kind of broken file is refused with an error naming it. Needs no GPU.

use d2l_wgpu::data::{Dataset, FashionMnist};
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::{Path, PathBuf};

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A fresh folder under the target directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes images and labels files (gzipped IDX) and tries to load them.
fn load(name: &str, images: Vec<u8>, labels: Vec<u8>) -> Result<Dataset, String> {
    let dir = scratch(name);
    std::fs::write(dir.join("images.gz"), images).unwrap();
    std::fs::write(dir.join("labels.gz"), labels).unwrap();
    Dataset::load(&dir.join("images.gz"), &dir.join("labels.gz")).map_err(|e| format!("{e:#}"))
}

fn good_images(count: u32) -> Vec<u8> {
    gzip(&idx_bytes(
        2051,
        &[count, 28, 28],
        &vec![7; count as usize * 784],
    ))
}

fn good_labels(count: u32) -> Vec<u8> {
    gzip(&idx_bytes(2049, &[count], &vec![3; count as usize]))
}

fn assert_error(result: Result<Dataset, String>, file: &str, what: &str) {
    let message = result.err().expect("loading should fail");
    assert!(
        message.contains(file),
        "error should name {file}: {message}"
    );
    assert!(
        message.contains(what),
        "error should say {what:?}: {message}"
    );
}

#[test]
fn fashion_mnist_loads_with_the_expected_sizes() {
    let data = FashionMnist::load(&FashionMnist::default_dir()).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));
    assert_eq!((data.train.height, data.train.width), (28, 28));
    // Every class appears 6,000 times in the training set.
    let mut counts = [0; 10];
    for &l in &data.train.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [6_000; 10]);
}

#[test]
fn a_small_valid_dataset_loads() {
    let data = load("valid", good_images(5), good_labels(5)).unwrap();
    assert_eq!(data.len(), 5);
    assert_eq!(data.image(4), &[7; 784][..]);
}

#[test]
fn missing_file() {
    let dir = scratch("missing");
    let result =
        Dataset::load(&dir.join("nope.gz"), &dir.join("labels.gz")).map_err(|e| format!("{e:#}"));
    assert_error(result, "nope.gz", "cannot open");
}

#[test]
fn not_gzip() {
    assert_error(
        load("not-gzip", b"plain text".to_vec(), good_labels(5)),
        "images.gz",
        "not a complete gzip file",
    );
}

#[test]
fn truncated_gzip() {
    let images = good_images(5);
    let cut = images[..images.len() / 2].to_vec();
    assert_error(
        load("truncated-gzip", cut, good_labels(5)),
        "images.gz",
        "not a complete gzip file",
    );
}

#[test]
fn wrong_magic() {
    let images = gzip(&idx_bytes(2049, &[5, 28, 28], &[0; 5 * 784]));
    assert_error(
        load("wrong-magic", images, good_labels(5)),
        "images.gz",
        "magic number is 2049, expected 2051",
    );
}

#[test]
fn data_shorter_than_the_header_says() {
    let images = gzip(&idx_bytes(2051, &[5, 28, 28], &[0; 4 * 784]));
    assert_error(
        load("short-data", images, good_labels(5)),
        "images.gz",
        "need 3920 bytes of data, the file has 3136",
    );
}

#[test]
fn truncated_header() {
    let images = gzip(&2051u32.to_be_bytes()[..]);
    assert_error(
        load("short-header", images, good_labels(5)),
        "images.gz",
        "header truncated",
    );
}

#[test]
fn image_and_label_counts_differ() {
    assert_error(
        load("counts", good_images(5), good_labels(4)),
        "images.gz has 5 images",
        "labels.gz has 4 labels",
    );
}

#[test]
fn label_out_of_range() {
    let labels = gzip(&idx_bytes(2049, &[5], &[0, 1, 2, 10, 4]));
    assert_error(
        load("label-range", good_images(5), labels),
        "labels.gz",
        "label 10 at index 3 is out of range",
    );
}

#[test]
fn empty_dataset() {
    assert_error(
        load("empty", good_images(0), good_labels(0)),
        "images.gz",
        "the dataset is empty",
    );
}
