//! The IDX format (gzip-compressed) of MNIST-style datasets: a big-endian
//! header (magic, then one u32 per dimension) followed by u8 values.

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

pub const IMAGES_MAGIC: u32 = 2051;
pub const LABELS_MAGIC: u32 = 2049;

/// The dimensions and bytes of one IDX file.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a gzip-compressed IDX file of unsigned bytes, checking the magic
/// number, that the header is complete and that the data has exactly the
/// size the header announces.
pub fn read_idx(path: &Path, magic: u32) -> Result<Idx> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut bytes = Vec::new();
    GzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: not a complete gzip file", path.display()))?;
    parse_idx(&bytes, magic).with_context(|| format!("{}", path.display()))
}

pub fn parse_idx(bytes: &[u8], magic: u32) -> Result<Idx> {
    let word = |i: usize| -> Option<u32> {
        bytes
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let found = word(0).context("file too short for an IDX header")?;
    if found != magic {
        bail!("IDX magic number is {found}, expected {magic}");
    }
    let rank = (magic & 0xff) as usize;
    let dims = (1..=rank)
        .map(|i| word(i).map(|d| d as usize))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("IDX header truncated: expected {rank} dimensions"))?;
    let header = 4 * (rank + 1);
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("IDX dimensions {dims:?} are too large"))?;
    let got = bytes.len() - header;
    if got != expected {
        bail!("dimensions {dims:?} need {expected} bytes of data, the file has {got}");
    }
    Ok(Idx {
        dims,
        data: bytes[header..].to_vec(),
    })
}
