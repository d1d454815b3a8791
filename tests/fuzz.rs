//! Property tests: no input, however broken, makes the IDX reader or the
//! checkpoint reader panic. Each runs a bounded number of cases inside
//! `cargo test`; every input gets either a value or an error.

use d2l_wgpu::data::idx::{parse_idx, IMAGES_MAGIC, LABELS_MAGIC};
use d2l_wgpu::train::checkpoint::{StoredTensor, TensorFile};
use proptest::prelude::*;

/// A valid IDX image file: `count` images of `h` x `w`.
fn idx_images(count: u32, h: u32, w: u32) -> Vec<u8> {
    let mut bytes: Vec<u8> = [IMAGES_MAGIC, count, h, w]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    bytes.extend((0..count * h * w).map(|i| i as u8));
    bytes
}

/// A small valid checkpoint, serialised.
fn checkpoint_bytes() -> Vec<u8> {
    let mut file = TensorFile::default();
    file.tensors.insert(
        "0.weight".into(),
        StoredTensor::f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    );
    file.tensors
        .insert("1.num_batches_tracked".into(), StoredTensor::i64(&[], &[7]));
    file.metadata.insert("model".into(), "lenet".into());
    let dir = std::env::temp_dir().join(format!("d2l-wgpu-fuzz-seed-{}", std::process::id()));
    file.write_atomic(&dir).unwrap();
    let bytes = std::fs::read(&dir).unwrap();
    std::fs::remove_file(&dir).unwrap();
    bytes
}

/// Changes `edits` bytes of `bytes` and cuts it to at most `keep` bytes.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
    for &(at, value) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = value;
        }
    }
    bytes.truncate(keep);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn idx_reader_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        for magic in [IMAGES_MAGIC, LABELS_MAGIC] {
            let _ = parse_idx(&bytes, magic);
        }
    }

    #[test]
    fn idx_reader_never_panics_on_damaged_files(
        count in 0u32..4, h in 0u32..5, w in 0u32..5,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        keep in 0usize..200,
    ) {
        let bytes = mutate(idx_images(count, h, w), &edits, keep);
        if let Ok(idx) = parse_idx(&bytes, IMAGES_MAGIC) {
            prop_assert_eq!(idx.data.len(), idx.dims.iter().product::<usize>());
        }
    }

    #[test]
    fn checkpoint_reader_never_panics_on_damaged_files(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        keep in 0usize..400,
    ) {
        let bytes = mutate(checkpoint_bytes(), &edits, keep);
        let path = std::env::temp_dir().join(format!("d2l-wgpu-fuzz-{}.safetensors", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(file) = TensorFile::read(&path) {
            for tensor in file.tensors.values() {
                let elements: usize = tensor.shape.iter().product();
                prop_assert_eq!(tensor.bytes.len(), elements * tensor.dtype.bitsize() / 8);
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// Header dimensions whose product overflows are an error, not a panic.
#[test]
fn idx_dimensions_that_overflow_are_refused() {
    let bytes: Vec<u8> = [IMAGES_MAGIC, u32::MAX, u32::MAX, u32::MAX]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let err = parse_idx(&bytes, IMAGES_MAGIC).err().unwrap();
    assert!(err.to_string().contains("are too large"), "{err}");
}
