//! Writing a GGUF file (version 3), the layout [`super::reader`] parses: header, metadata, tensor
//! directory, padding to `general.alignment` (32), then each tensor's data padded to the alignment.
//!
//! The directory is known before any data (sizes follow from shape and type), so tensors are
//! produced and written one at a time: a 7B export never holds more than one tensor in memory.
//! The file is written to a temporary name and renamed at the end.

use super::dequant::GgmlType;
use super::reader::{MetaValue, DEFAULT_ALIGNMENT};
use crate::io::write_atomic_with;
use anyhow::{bail, Result};
use std::path::Path;

/// One tensor of the directory: name, shape in Hugging Face order, ggml type id.
pub struct TensorEntry {
    pub name: String,
    pub hf_shape: Vec<usize>,
    pub type_id: u32,
}

impl TensorEntry {
    fn bytes(&self) -> usize {
        let elements = self.hf_shape.iter().product::<usize>() as u64;
        GgmlType::from_id(self.type_id)
            .expect("entries are made from known types")
            .bytes_for(elements)
    }
}

/// A GGUF file's metadata and tensor directory, before its data is written.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorEntry>,
}

impl GgufWriter {
    /// Adds a metadata key (keys are written in the order added).
    pub fn add(&mut self, key: &str, value: MetaValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// Adds a tensor to the directory; its bytes come from `write`'s callback, in this order.
    pub fn add_tensor(&mut self, entry: TensorEntry) {
        self.tensors.push(entry);
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Writes the file atomically; `data(i)` returns the bytes of tensor `i` (checked against its size).
    pub fn write(&self, path: &Path, mut data: impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
        write_atomic_with(path, |w| {
            let mut header = Vec::new();
            header.extend_from_slice(b"GGUF");
            header.extend_from_slice(&3u32.to_le_bytes());
            header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
            for (key, value) in &self.metadata {
                put_string(&mut header, key);
                header.extend_from_slice(&value_type(value).to_le_bytes());
                put_value(&mut header, value);
            }
            let mut offset = 0usize;
            for t in &self.tensors {
                put_string(&mut header, &t.name);
                header.extend_from_slice(&(t.hf_shape.len() as u32).to_le_bytes());
                // ggml order: the row length first.
                for &d in t.hf_shape.iter().rev() {
                    header.extend_from_slice(&(d as u64).to_le_bytes());
                }
                header.extend_from_slice(&t.type_id.to_le_bytes());
                header.extend_from_slice(&(offset as u64).to_le_bytes());
                offset = padded(offset + t.bytes());
            }
            header.resize(padded(header.len()), 0);
            w.write_all(&header)?;
            for (i, t) in self.tensors.iter().enumerate() {
                let bytes = data(i)?;
                if bytes.len() != t.bytes() {
                    bail!(
                        "tensor `{}` came out as {} bytes, its directory entry says {}",
                        t.name,
                        bytes.len(),
                        t.bytes()
                    );
                }
                w.write_all(&bytes)?;
                w.write_all(&vec![0u8; padded(bytes.len()) - bytes.len()])?;
            }
            Ok(())
        })
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// gguf.md `gguf_metadata_value_type`. An empty array is written as an array of strings (the only
/// arrays that can be empty here are token merges).
fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            let element = items
                .first()
                .map_or(value_type(&MetaValue::String(String::new())), value_type);
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::GgufFile;

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::default();
        let meta = [
            ("a.u32", MetaValue::U32(7)),
            ("a.f32", MetaValue::F32(1e-5)),
            ("a.bool", MetaValue::Bool(true)),
            ("a.str", MetaValue::String("llama".into())),
            (
                "a.arr",
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-3)]),
            ),
            ("a.empty", MetaValue::Array(vec![])),
        ];
        for (k, v) in &meta {
            w.add(k, v.clone());
        }
        w.add_tensor(TensorEntry {
            name: "x".into(),
            hf_shape: vec![2, 3],
            type_id: 0,
        });
        w.add_tensor(TensorEntry {
            name: "y".into(),
            hf_shape: vec![5],
            type_id: 1,
        });
        let values = [vec![1f32, 2., 3., 4., 5., 6.], vec![0.5f32; 5]];
        w.write(&path, |i| {
            Ok(if i == 0 {
                values[0].iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                values[1]
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect()
            })
        })
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        for (k, v) in &meta {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        let x = f.tensor("x").unwrap();
        assert_eq!((x.dims.clone(), x.offset), (vec![3, 2], 0));
        assert_eq!(f.dequantize(x).unwrap(), values[0]);
        let y = f.tensor("y").unwrap();
        assert_eq!(y.offset, 32);
        assert_eq!(f.dequantize(y).unwrap(), values[1]);
    }

    #[test]
    fn a_tensor_of_the_wrong_size_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::default();
        w.add_tensor(TensorEntry {
            name: "x".into(),
            hf_shape: vec![4],
            type_id: 0,
        });
        let e = w.write(&path, |_| Ok(vec![0; 3])).unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("tensor `x` came out as 3 bytes, its directory entry says 16"),
            "{e:#}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
