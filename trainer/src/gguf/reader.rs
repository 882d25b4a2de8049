//! Reading a GGUF file (llama.cpp's single-file model format, versions 2 and 3), memory-mapped.
//!
//! Layout (all little-endian; ggml/docs/gguf.md):
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | metadata_kv_count u64
//! metadata_kv_count × (key: string, value_type u32, value)
//! tensor_count × (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32) | tensor data (offsets are relative to its start)
//! ```
//! A string is `len u64` + UTF-8 bytes; an array is `element_type u32` + `count u64` + elements.
//! `dims[0]` is the fastest-varying (row length), the reverse of PyTorch's shape.

use super::dequant::{GgmlType, UnsupportedType};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What can go wrong reading a GGUF file; every message names the file.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a GGUF file: it starts with {found:?}, not the magic \"GGUF\"")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path} is GGUF version {version}; fuselora reads versions 2 and 3 (re-convert the model with a current llama.cpp)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} is truncated: {what} at byte {offset} needs {needed} bytes but the file has {len} (is the download complete?)")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: cannot dequantize tensor `{tensor}`: {reason}")]
    Unsupported {
        path: PathBuf,
        tensor: String,
        reason: UnsupportedType,
    },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is F32 or F64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor is and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// The raw ggml type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch / Hugging Face order (`dims` reversed).
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: its metadata and tensor directory, with the data memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    data_start: usize,
    map: Mmap,
}

/// The alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

impl GgufFile {
    /// Opens and parses `path`; checks that every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |error| GgufError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is only read; a concurrent writer could change bytes under us, as with any mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = Cursor {
            path,
            bytes: &map,
            pos: 0,
        }
        .header()?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
            map,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A tensor's info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's ggml type (known: checked when the file was opened).
    pub fn tensor_type(&self, info: &TensorInfo) -> GgmlType {
        GgmlType::from_id(info.type_id).expect("type ids are checked when the file is opened")
    }

    /// The stored bytes of a tensor (its range was checked when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        &self.map[start..start + self.tensor_type(info).bytes_for(info.elements())]
    }

    /// The tensor's values as f32, in ggml order (row-major over the reversed `dims`).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        self.tensor_type(info)
            .dequantize(self.tensor_bytes(info))
            .map_err(|reason| GgufError::Unsupported {
                path: self.path.clone(),
                tensor: info.name.clone(),
                reason,
            })
    }
}

struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: usize,
    data_start: usize,
}

/// A read position in the file's bytes; every read checks bounds and reports truncation.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

/// Value type ids of metadata (gguf.md `gguf_metadata_value_type`).
const TYPE_ARRAY: u32 = 9;

impl<'a> Cursor<'a> {
    fn header(mut self) -> Result<Header, GgufError> {
        let magic = self.take(4, "the magic")?;
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: self.path.to_path_buf(),
                found: magic.to_vec(),
            });
        }
        let version = self.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        let tensor_count = self.u64("the tensor count")?;
        let kv_count = self.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = self.string(&format!("metadata key #{i}"))?;
            let value_type = self.u32(&format!("the type of metadata `{key}`"))?;
            let value = self.value(value_type, &key)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => {
                    return Err(self.malformed(format!(
                        "general.alignment is {v:?}; it must be a power of two"
                    )))
                }
            },
        };
        let mut tensors = Vec::new();
        for i in 0..tensor_count {
            tensors.push(self.tensor_info(i)?);
        }
        let data_start = self.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            self.check_tensor_range(t, data_start, alignment)?;
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    fn tensor_info(&mut self, i: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string(&format!("the name of tensor #{i}"))?;
        let n_dims = self.u32(&format!("the rank of tensor `{name}`"))?;
        if n_dims > 4 {
            return Err(self.malformed(format!(
                "tensor `{name}` has {n_dims} dimensions; ggml allows at most 4"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64(&format!("the shape of tensor `{name}`")))
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = self.u32(&format!("the type of tensor `{name}`"))?;
        let offset = self.u64(&format!("the offset of tensor `{name}`"))?;
        Ok(TensorInfo {
            name,
            dims,
            type_id,
            offset,
        })
    }

    /// Every tensor must be aligned, a whole number of blocks, and lie inside the file.
    fn check_tensor_range(
        &self,
        t: &TensorInfo,
        data_start: usize,
        alignment: usize,
    ) -> Result<(), GgufError> {
        let Some(ty) = GgmlType::from_id(t.type_id) else {
            return Err(self.malformed(format!(
                "tensor `{}` has ggml type id {}, which no ggml version defines",
                t.name, t.type_id
            )));
        };
        if !(t.offset as usize).is_multiple_of(alignment) {
            return Err(self.malformed(format!(
                "tensor `{}` starts at offset {}, not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let row = t.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block_elements() as u64) {
            return Err(self.malformed(format!(
                "tensor `{}` ({}) has rows of {row} values, not a multiple of its block size {}",
                t.name,
                ty.name(),
                ty.block_elements()
            )));
        }
        let start = data_start as u64 + t.offset;
        let needed = ty.bytes_for(t.elements());
        if start + needed as u64 > self.bytes.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("the data of tensor `{}`", t.name),
                offset: start as usize,
                needed,
                len: self.bytes.len(),
            });
        }
        Ok(())
    }

    fn value(&mut self, value_type: u32, key: &str) -> Result<MetaValue, GgufError> {
        if value_type == TYPE_ARRAY {
            let element_type = self.u32(&format!("the element type of array `{key}`"))?;
            if element_type == TYPE_ARRAY {
                return Err(self.malformed(format!(
                    "metadata `{key}` is an array of arrays, which GGUF readers do not support"
                )));
            }
            let count = self.u64(&format!("the length of array `{key}`"))?;
            // Each element takes at least one byte: a count beyond the file is truncation, not an allocation.
            let remaining = (self.bytes.len() - self.pos) as u64;
            if count > remaining {
                return Err(self.truncated(&format!("array `{key}`"), count as usize));
            }
            let items = (0..count)
                .map(|_| self.scalar(element_type, key))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(MetaValue::Array(items));
        }
        self.scalar(value_type, key)
    }

    fn scalar(&mut self, value_type: u32, key: &str) -> Result<MetaValue, GgufError> {
        let what = format!("metadata `{key}`");
        Ok(match value_type {
            0 => MetaValue::U8(self.take(1, &what)?[0]),
            1 => MetaValue::I8(self.take(1, &what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(self.u32(&what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.take(1, &what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.malformed(format!("{what} is a bool stored as {b}"))),
            },
            8 => MetaValue::String(self.string(&what)?),
            10 => MetaValue::U64(self.u64(&what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(self.malformed(format!(
                    "{what} has value type {other}; GGUF defines 0 to 12"
                )))
            }
        })
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if self.bytes.len() - self.pos < n {
            return Err(self.truncated(what, n));
        }
        let bytes: &'a [u8] = self.bytes;
        let out = &bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > (self.bytes.len() - self.pos) as u64 {
            return Err(self.truncated(what, len as usize));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.malformed(format!("{what} is not valid UTF-8")))
    }

    fn truncated(&self, what: &str, needed: usize) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos,
            needed,
            len: self.bytes.len(),
        }
    }

    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            what,
        }
    }
}
