//! Tensors of a Hugging Face folder: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, read as f32 whatever they are stored in.

use anyhow::{anyhow, bail, Context, Result};
use kernels::DType;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The memory-mapped safetensors files of one model folder and which file holds which tensor.
pub struct WeightFiles {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `maps`
    index: BTreeMap<String, usize>,
}

impl WeightFiles {
    /// Opens the weights of `dir`, explaining what to do when only pickled weights are there.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no `weight_map` object", index_path.display()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            bail!(
                "{} holds only pickled PyTorch weights (pytorch_model.bin), which fuselora refuses to load: \
                 unpickling can run arbitrary code. Convert them once with transformers: \
                 `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`",
                dir.display()
            );
        } else {
            bail!("{} has no model.safetensors or model.safetensors.index.json: is it a Hugging Face model folder?", dir.display());
        };
        Self::open_files(dir, files)
    }

    /// Opens one safetensors file (an adapter, a test case's inputs).
    pub fn open_file(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::open_files(dir, vec![path.to_path_buf()])
    }

    fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let file = File::open(&path)
                .with_context(|| format!("cannot open weight file {}", path.display()))?;
            // SAFETY: the file is only read; a concurrent writer could change bytes under us, as with any mmap reader.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let st = SafeTensors::deserialize(&map)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), maps.len());
            }
            maps.push((path, map));
        }
        Ok(WeightFiles {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor's shape and dtype.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, Dtype)> {
        let (_, view) = self.view(name)?;
        Ok((view.shape().to_vec(), view.dtype()))
    }

    /// The raw bytes of a tensor (for U8 quantized data), with its shape.
    pub fn bytes(&self, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
        let (_, view) = self.view(name)?;
        Ok((view.shape().to_vec(), view.data().to_vec()))
    }

    /// A bf16 or f16 tensor's bit patterns (and which of the two), checking its shape against
    /// `expected`; `None` for tensors stored in another dtype.
    pub fn bits_16(&self, name: &str, expected: &[usize]) -> Result<Option<(DType, Vec<u16>)>> {
        let (_, view) = self.shaped_view(name, expected)?;
        let stored = match view.dtype() {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            _ => return Ok(None),
        };
        let bits = view
            .data()
            .par_chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Some((stored, bits)))
    }

    /// The tensor as f32, checking its shape against `expected`.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (path, view) = self.shaped_view(name, expected)?;
        to_f32(view.dtype(), view.data())
            .with_context(|| format!("tensor `{name}` in {}", path.display()))
    }

    /// [`WeightFiles::view`], refusing a shape other than `expected`.
    fn shaped_view(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let (path, view) = self.view(name)?;
        if view.shape() != expected {
            bail!(
                "tensor `{name}` in {} has shape {:?}, expected {:?}",
                path.display(),
                view.shape(),
                expected
            );
        }
        Ok((path, view))
    }

    fn view(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let &i = self.index.get(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from {} (is this checkpoint complete?)",
                self.dir.display()
            )
        })?;
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map)?;
        Ok((path.as_path(), st.tensor(name)?))
    }
}

/// Converts raw little-endian F32/F16/BF16 bytes to f32 (on every core: a 7B checkpoint is
/// 6.7 billion values, and each conversion is exact and independent).
pub fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .par_chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .par_chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            bail!("dtype {other:?} cannot be read as floating point (supported: F32, F16, BF16)")
        }
    })
}

/// Converts raw little-endian I64/I32 bytes to i64.
pub fn to_i64(dtype: Dtype, data: &[u8]) -> Result<Vec<i64>> {
    Ok(match dtype {
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect(),
        other => bail!("dtype {other:?} cannot be read as integers (supported: I64, I32)"),
    })
}
