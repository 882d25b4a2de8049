//! Embedding lookup: `out[i,:] = table[ids[i],:]`. Frozen, so there is no backward.

use crate::{KernelError, Result};

pub fn gather(table: &[f32], ids: &[i32], hidden: usize, out: &mut [f32]) -> Result<()> {
    let vocab = table.len() / hidden;
    for (row, &id) in out.chunks_mut(hidden).zip(ids) {
        if id < 0 || id as usize >= vocab {
            return Err(KernelError::Unsupported(format!(
                "embedding: token id {id} outside the vocabulary of {vocab}"
            )));
        }
        row.copy_from_slice(&table[id as usize * hidden..][..hidden]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_copied_and_bad_ids_refused() {
        let table: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut out = vec![0.0; 4];
        gather(&table, &[2, 0], 2, &mut out).unwrap();
        assert_eq!(out, vec![4.0, 5.0, 0.0, 1.0]);
        assert!(gather(&table, &[3], 2, &mut out[..2]).is_err());
    }
}
