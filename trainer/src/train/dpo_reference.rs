//! Reference log-probabilities computed once for a whole dataset (`dpo.precompute_ref`) and
//! cached as `OUTPUT/reference_logps.json`: the base weights alone (no adapter, no gradient), in
//! the same forward kernels as training. The file holds a fingerprint of the model folder and of
//! every pair's tokens (FNV-1a, 64 bits); a cache whose fingerprint differs is recomputed.

use super::pairs::{pair_logps, sequence_logps, Layout, PairLogps, PairMicroBatch};
use crate::data::preference::PreferencePair;
use crate::model::Decoder;
use anyhow::{Context, Result};
use kernels::Backend;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The log-probabilities are stored as f64 bit patterns, `[chosen, rejected]` per pair, so that a
/// run reading the cache sees exactly the values of the run that wrote it.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    fingerprint: String,
    logps_f64_bits: Vec<[u64; 2]>,
}

/// FNV-1a over the model path and every pair's prompt, chosen and rejected ids.
pub fn fingerprint(model: &str, pairs: &[PreferencePair]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(model.as_bytes());
    for p in pairs {
        for part in [&p.prompt, &p.chosen, &p.rejected] {
            eat(&(part.len() as u64).to_le_bytes());
            part.iter().for_each(|id| eat(&id.to_le_bytes()));
        }
    }
    format!("{h:016x}")
}

/// Reference log-probabilities of every pair, in order.
pub fn compute<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    pairs: &[PreferencePair],
    l: &Layout,
) -> Result<Vec<PairLogps>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(l.pairs_per_batch.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let mb = PairMicroBatch::new(&refs, Vec::new(), l);
        let batch = mb.upload(be, model)?;
        out.extend(pair_logps(
            &sequence_logps(be, model, None, &batch, &mb.seqs)?.0,
        ));
    }
    Ok(out)
}

/// The cached log-probabilities at `path` when their fingerprint matches, else computed and
/// written there. Returns them and whether they came from the file.
pub fn load_or_compute<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    model_id: &str,
    pairs: &[PreferencePair],
    l: &Layout,
    path: &Path,
) -> Result<(Vec<PairLogps>, bool)> {
    let fp = fingerprint(model_id, pairs);
    if let Ok(text) = std::fs::read_to_string(path) {
        let cached: CacheFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a reference cache; delete it to recompute",
                path.display()
            )
        })?;
        if cached.fingerprint == fp && cached.logps_f64_bits.len() == pairs.len() {
            let logps = cached
                .logps_f64_bits
                .iter()
                .map(|&[c, r]| PairLogps {
                    chosen: f64::from_bits(c),
                    rejected: f64::from_bits(r),
                })
                .collect();
            return Ok((logps, true));
        }
    }
    let logps = compute(be, model, pairs, l)?;
    let file = CacheFile {
        fingerprint: fp,
        logps_f64_bits: logps
            .iter()
            .map(|p| [p.chosen.to_bits(), p.rejected.to_bits()])
            .collect(),
    };
    crate::io::write_atomic(path, serde_json::to_string(&file)?.as_bytes())?;
    Ok((logps, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::{to_i64, WeightFiles};
    use crate::model::ModelConfig;
    use kernels::cpu::CpuBackend;
    use std::path::PathBuf;

    #[test]
    fn packed_and_padded_reference_logps_match_the_fixture_and_the_cache() {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama-dpo");
        let be = CpuBackend::new();
        let config = ModelConfig::load(&dir.join("model")).unwrap();
        let files = WeightFiles::open(&dir.join("model")).unwrap();
        let model = Decoder::load(&be, config, &files).unwrap();
        let inputs = WeightFiles::open_file(&dir.join("inputs.safetensors")).unwrap();
        let ids = |name: &str| -> Vec<i32> {
            let (_, dtype) = inputs.info(name).unwrap();
            let (_, bytes) = inputs.bytes(name).unwrap();
            to_i64(dtype, &bytes)
                .unwrap()
                .into_iter()
                .map(|x| x as i32)
                .collect()
        };
        let pairs: Vec<PreferencePair> = (0..2)
            .map(|k| PreferencePair {
                prompt: ids(&format!("pair{k}_prompt_ids")),
                chosen: ids(&format!("pair{k}_chosen_ids")),
                rejected: ids(&format!("pair{k}_rejected_ids")),
            })
            .collect();
        let expected = WeightFiles::open_file(&dir.join("expected.safetensors")).unwrap();
        let want_c = expected.f32("reference_chosen_logps", &[2]).unwrap();
        let want_r = expected.f32("reference_rejected_logps", &[2]).unwrap();
        for packing in [true, false] {
            let l = Layout {
                pairs_per_batch: 2,
                packing,
                row_len: 30,
                pad_id: 0,
            };
            let got = compute(&be, &model, &pairs, &l).unwrap();
            for k in 0..2 {
                assert!((got[k].chosen - want_c[k] as f64).abs() < 1e-4 * want_c[k].abs() as f64);
                assert!((got[k].rejected - want_r[k] as f64).abs() < 1e-4 * want_r[k].abs() as f64);
            }
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("reference_logps.json");
            let (first, cached) = load_or_compute(&be, &model, "m", &pairs, &l, &path).unwrap();
            assert!(!cached);
            let (again, cached) = load_or_compute(&be, &model, "m", &pairs, &l, &path).unwrap();
            assert!(cached);
            assert_eq!(first, again);
            let (_, cached) = load_or_compute(&be, &model, "other", &pairs, &l, &path).unwrap();
            assert!(!cached, "a different model must not reuse the cache");
        }
    }

    #[test]
    fn fingerprints_change_with_tokens_boundaries_and_model() {
        let p = |prompt: Vec<i32>, chosen: Vec<i32>| PreferencePair {
            prompt,
            chosen,
            rejected: vec![9],
        };
        let a = fingerprint("m", &[p(vec![1, 2], vec![3])]);
        assert_eq!(a, fingerprint("m", &[p(vec![1, 2], vec![3])]));
        assert_ne!(a, fingerprint("m", &[p(vec![1], vec![2, 3])]));
        assert_ne!(a, fingerprint("m", &[p(vec![1, 2], vec![4])]));
        assert_ne!(a, fingerprint("n", &[p(vec![1, 2], vec![3])]));
        assert_eq!(a.len(), 16);
    }
}
