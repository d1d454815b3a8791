//! Checkpoints in safetensors. The weights file holds exactly the PyTorch
//! `state_dict` of d2l's model (f32 tensors, BatchNorm's
//! `num_batches_tracked` as int64), so it loads into the PyTorch model with
//! `load_state_dict(strict=True)`. What only resuming needs (optimizer
//! state, step counts, random streams, the finished epochs' metrics) goes in
//! a sidecar file next to it. Files are written atomically: a temporary file
//! in the same folder, fsync, rename.

use super::atomic::write_atomic;
use crate::gpu::Gpu;
use crate::graph::ParamStore;
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One tensor as stored: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn f32(shape: &[usize], values: &[f32]) -> StoredTensor {
        StoredTensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(shape: &[usize], values: &[i64]) -> StoredTensor {
        StoredTensor {
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn u64(values: &[u64]) -> StoredTensor {
        StoredTensor {
            dtype: Dtype::U64,
            shape: vec![values.len()],
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn words<const N: usize>(&self) -> impl Iterator<Item = [u8; N]> + '_ {
        self.bytes
            .chunks_exact(N)
            .map(|c| c.try_into().expect("chunks are N bytes"))
    }

    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == Dtype::F32).then(|| self.words().map(f32::from_le_bytes).collect())
    }

    pub fn to_i64(&self) -> Option<Vec<i64>> {
        (self.dtype == Dtype::I64).then(|| self.words().map(i64::from_le_bytes).collect())
    }

    pub fn to_u64(&self) -> Option<Vec<u64>> {
        (self.dtype == Dtype::U64).then(|| self.words().map(u64::from_le_bytes).collect())
    }
}

/// The tensors and string metadata of one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, StoredTensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let invalid = |e: safetensors::SafeTensorError| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
        let file = SafeTensors::deserialize(&bytes).map_err(invalid)?;
        let tensors = file
            .iter()
            .map(|(name, view)| {
                let tensor = StoredTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                };
                (name.to_string(), tensor)
            })
            .collect();
        Ok(TensorFile {
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    /// Writes the file so that `path` always holds either its previous
    /// content or the complete new one.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let views = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .with_context(|| format!("tensor {name}"))?;
                Ok((name.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, Some(self.metadata.clone()))
            .with_context(|| format!("encoding {}", path.display()))?;
        write_atomic(path, &bytes)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

/// The sidecar of a checkpoint: `run.safetensors` -> `run.train-state.safetensors`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let stem = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => path.with_extension(""),
        _ => path.to_path_buf(),
    };
    let mut name = stem.into_os_string();
    name.push(".train-state.safetensors");
    PathBuf::from(name)
}

/// `0.running_mean` -> `0.num_batches_tracked`: one per BatchNorm layer.
fn batches_tracked_keys(params: &ParamStore) -> Vec<String> {
    params
        .state_specs()
        .iter()
        .filter_map(|s| s.name.strip_suffix(".running_mean"))
        .map(|layer| format!("{layer}.num_batches_tracked"))
        .collect()
}

/// The model's state_dict as it is on the GPU now; BatchNorm layers have
/// seen `steps` training batches.
pub fn state_dict(gpu: &Gpu, params: &ParamStore, steps: u64) -> Result<TensorFile> {
    let mut file = TensorFile::default();
    for (i, spec) in params.specs().iter().enumerate() {
        let values = params.read(gpu, i)?;
        file.tensors
            .insert(spec.name.clone(), StoredTensor::f32(&spec.shape, &values));
    }
    for (i, spec) in params.state_specs().iter().enumerate() {
        let values = params.read_state(gpu, i)?;
        file.tensors
            .insert(spec.name.clone(), StoredTensor::f32(&spec.shape, &values));
    }
    for key in batches_tracked_keys(params) {
        file.tensors
            .insert(key, StoredTensor::i64(&[], &[steps as i64]));
    }
    file.metadata.insert("format".into(), "pt".into());
    Ok(file)
}

/// Loads a state_dict into the parameters and running statistics, as
/// `load_state_dict(strict=True)`: every key must be present with its shape
/// and nothing else may be there.
pub fn load_state_dict(
    gpu: &Gpu,
    params: &ParamStore,
    file: &TensorFile,
    path: &Path,
) -> Result<()> {
    let mut expected: Vec<(String, Vec<usize>, Dtype)> = params
        .specs()
        .iter()
        .chain(params.state_specs())
        .map(|s| (s.name.clone(), s.shape.clone(), Dtype::F32))
        .collect();
    expected.extend(
        batches_tracked_keys(params)
            .into_iter()
            .map(|k| (k, vec![], Dtype::I64)),
    );
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (key, shape, dtype) in &expected {
        match file.tensors.get(key) {
            None => missing.push(key.clone()),
            Some(t) if t.dtype != *dtype || &t.shape != shape => mismatched.push(format!(
                "{key}: the file has {:?} {:?}, the model needs {dtype:?} {shape:?}",
                t.dtype, t.shape
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = file
        .tensors
        .keys()
        .filter(|k| !expected.iter().any(|(e, _, _)| e == *k))
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        let mut message = format!("{} does not fit the model:", path.display());
        if !missing.is_empty() {
            message += &format!("\n  missing keys: {}", missing.join(", "));
        }
        if !unexpected.is_empty() {
            let names: Vec<&str> = unexpected.iter().map(|k| k.as_str()).collect();
            message += &format!("\n  unexpected keys: {}", names.join(", "));
        }
        for m in mismatched {
            message += &format!("\n  shape mismatch: {m}");
        }
        bail!(message);
    }
    let values = |name: &str| {
        file.tensors[name]
            .to_f32()
            .expect("dtypes were checked above")
    };
    for (i, spec) in params.specs().iter().enumerate() {
        params.write(gpu, i, &values(&spec.name))?;
    }
    for (i, spec) in params.state_specs().iter().enumerate() {
        params.write_state(gpu, i, &values(&spec.name))?;
    }
    Ok(())
}

/// What a checkpoint records about the run that wrote it.
pub struct SavedSettings {
    pub model: Option<String>,
    pub resize: Option<usize>,
    /// Epochs finished when it was saved.
    pub epoch: Option<usize>,
}

pub fn saved_settings(path: &Path) -> Result<SavedSettings> {
    let file = TensorFile::read(path)?;
    Ok(SavedSettings {
        model: file.meta("model").map(String::from),
        resize: file.meta("resize").and_then(|r| r.parse().ok()),
        epoch: file.meta("epoch").and_then(|e| e.parse().ok()),
    })
}
