//! Token shard files (`*.tokens`): pre-tokenized examples that `fuselora prepare-data` writes and
//! training ranks memory-map, so a dataset too large to tokenize at start is tokenized once and
//! each rank reads the pages of its own examples only.
//!
//! Layout, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FLTOKEN1` |
//! | 8 | `count`: examples in the file (u64) |
//! | 4 | `pad_id` of the tokenizer that made it (i32) |
//! | 4 | zero |
//! | 8 × (count + 1) | `offsets`: example `i` is tokens `offsets[i]..offsets[i+1]` (u64) |
//! | 4 × total | ids (i32) |
//! | 4 × total | labels (i32; −100 = not trained, Hugging Face's convention) |

use super::batching::Example;
use super::source::ExampleSource;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FLTOKEN1";
const HEADER_BYTES: usize = 24;

/// The file extension that marks token shards in `data.train` / `data.validation`.
pub const EXTENSION: &str = "tokens";

/// True when `path` names a token shard file.
pub fn is_token_shard(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == EXTENSION)
}

/// Writes `examples` as one shard file at `path` (atomically).
pub fn write_shard(path: &Path, examples: &[Example], pad_id: i32) -> Result<()> {
    let total: usize = examples.iter().map(|e| e.ids.len()).sum();
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 8 * (examples.len() + 1) + 8 * total);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&pad_id.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    let mut offset = 0u64;
    bytes.extend_from_slice(&offset.to_le_bytes());
    for e in examples {
        offset += e.ids.len() as u64;
        bytes.extend_from_slice(&offset.to_le_bytes());
    }
    for e in examples {
        bytes.extend(e.ids.iter().flat_map(|x| x.to_le_bytes()));
    }
    for e in examples {
        bytes.extend(e.labels.iter().flat_map(|x| x.to_le_bytes()));
    }
    crate::io::write_atomic(path, &bytes)
}

/// One memory-mapped shard.
struct Shard {
    map: Mmap,
    count: usize,
    total: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<(Shard, i32)> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is only read; prepare-data writes shards to a temp name and renames
        // them, so a mapped shard is never rewritten in place.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let bad = |why: String| -> Result<(Shard, i32)> {
            bail!(
                "{} is not a fuselora token shard ({why}); make it with `fuselora prepare-data`",
                path.display()
            )
        };
        if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
            return bad("no FLTOKEN1 header".into());
        }
        let count = u64::from_le_bytes(map[8..16].try_into().unwrap()) as usize;
        let pad_id = i32::from_le_bytes(map[16..20].try_into().unwrap());
        let index_end = HEADER_BYTES + 8 * (count + 1);
        if map.len() < index_end {
            return bad(format!("{count} examples but the index is cut short"));
        }
        let shard = Shard {
            map,
            count,
            total: 0,
        };
        let total = shard.offset(count);
        if shard.map.len() != index_end + 8 * total {
            return bad(format!(
                "{} bytes, expected {} for {count} examples of {total} tokens",
                shard.map.len(),
                index_end + 8 * total
            ));
        }
        if (0..count).any(|i| shard.offset(i) > shard.offset(i + 1)) {
            return bad("example offsets decrease".into());
        }
        Ok((Shard { total, ..shard }, pad_id))
    }

    fn offset(&self, i: usize) -> usize {
        let at = HEADER_BYTES + 8 * i;
        u64::from_le_bytes(self.map[at..at + 8].try_into().unwrap()) as usize
    }

    fn read_i32s(&self, start: usize, len: usize, out: &mut Vec<i32>) {
        let bytes = &self.map[start..start + 4 * len];
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap())),
        );
    }
}

/// Several shard files read as one list of examples, in the order given.
pub struct TokenShards {
    shards: Vec<Shard>,
    /// `first[s]` = global index of shard `s`'s first example; last entry = total count.
    first: Vec<usize>,
    pad_id: i32,
    paths: Vec<PathBuf>,
}

impl TokenShards {
    /// Maps every file of `paths`; their pad ids must agree.
    pub fn open(paths: &[PathBuf]) -> Result<TokenShards> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut first = vec![0];
        let mut pad = None;
        for path in paths {
            let (shard, pad_id) = Shard::open(path)?;
            match pad {
                Some(p) if p != pad_id => bail!(
                    "{} was made with pad id {pad_id}, {} with {p}: prepare all shards with one tokenizer",
                    path.display(),
                    paths[0].display()
                ),
                _ => pad = Some(pad_id),
            }
            first.push(first.last().unwrap() + shard.count);
            shards.push(shard);
        }
        Ok(TokenShards {
            shards,
            first,
            pad_id: pad.unwrap_or(0),
            paths: paths.to_vec(),
        })
    }

    /// The pad id recorded by prepare-data.
    pub fn pad_id(&self) -> i32 {
        self.pad_id
    }

    /// Tokens in all examples.
    pub fn total_tokens(&self) -> usize {
        self.shards.iter().map(|s| s.total).sum()
    }

    /// The files, for messages.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Every example, read into memory (for evaluation sets).
    pub fn read_all(&self) -> Vec<Example> {
        (0..self.count())
            .map(|i| {
                let mut e = Example {
                    ids: Vec::new(),
                    labels: Vec::new(),
                };
                self.append(i, &mut e.ids, &mut e.labels);
                e
            })
            .collect()
    }

    /// Where example `i` lives: `FILE example J`, for messages.
    pub fn origin(&self, i: usize) -> String {
        let s = self.first.partition_point(|&f| f <= i) - 1;
        format!("{} example {}", self.paths[s].display(), i - self.first[s])
    }

    fn locate(&self, i: usize) -> (&Shard, usize) {
        let s = self.first.partition_point(|&f| f <= i) - 1;
        (&self.shards[s], i - self.first[s])
    }
}

impl ExampleSource for TokenShards {
    fn count(&self) -> usize {
        *self.first.last().unwrap()
    }

    fn length(&self, i: usize) -> usize {
        let (shard, j) = self.locate(i);
        shard.offset(j + 1) - shard.offset(j)
    }

    fn append(&self, i: usize, ids: &mut Vec<i32>, labels: &mut Vec<i32>) {
        let (shard, j) = self.locate(i);
        let (start, end) = (shard.offset(j), shard.offset(j + 1));
        let ids_at = HEADER_BYTES + 8 * (shard.count + 1);
        let labels_at = ids_at + 4 * shard.total;
        shard.read_i32s(ids_at + 4 * start, end - start, ids);
        shard.read_i32s(labels_at + 4 * start, end - start, labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i32], first_label: i32) -> Example {
        let mut labels = ids.to_vec();
        labels[0] = first_label;
        Example {
            ids: ids.to_vec(),
            labels,
        }
    }

    #[test]
    fn shards_read_back_as_one_list() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![ex(&[5, 6, 7], -100), ex(&[8], 8)];
        let b = vec![ex(&[1, 2], -100), ex(&[3, 4, 5, 6], 3), ex(&[9], -100)];
        let (pa, pb) = (dir.path().join("a.tokens"), dir.path().join("b.tokens"));
        write_shard(&pa, &a, 2).unwrap();
        write_shard(&pb, &b, 2).unwrap();
        let shards = TokenShards::open(&[pa, pb]).unwrap();
        assert_eq!(shards.count(), 5);
        assert_eq!(shards.pad_id(), 2);
        assert_eq!(shards.total_tokens(), 11);
        let lengths: Vec<usize> = (0..5).map(|i| shards.length(i)).collect();
        assert_eq!(lengths, vec![3, 1, 2, 4, 1]);
        let all: Vec<Example> = a.into_iter().chain(b).collect();
        assert_eq!(shards.read_all(), all);
    }

    #[test]
    fn a_cut_file_or_a_foreign_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.tokens");
        write_shard(&path, &[ex(&[1, 2, 3], 1)], 0).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = TokenShards::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cut.tokens") && err.contains("expected"),
            "{err}"
        );
        std::fs::write(&path, b"{\"text\": \"hello\"}\n").unwrap();
        let err = TokenShards::open(&[path]).err().unwrap().to_string();
        assert!(err.contains("prepare-data"), "{err}");
    }

    #[test]
    fn shards_with_different_pad_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a.tokens"), dir.path().join("b.tokens"));
        write_shard(&pa, &[ex(&[1, 2], 1)], 0).unwrap();
        write_shard(&pb, &[ex(&[1, 2], 1)], 3).unwrap();
        let err = TokenShards::open(&[pa, pb]).err().unwrap().to_string();
        assert!(err.contains("pad id 3"), "{err}");
    }
}
