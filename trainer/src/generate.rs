//! Text generation: the prompt runs through the model once (prefill), then one token at a time
//! with the KV cache. Greedy at temperature 0; otherwise softmax(logits / T) restricted to the
//! smallest set of tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020).

use crate::lora::LoraParams;
use crate::model::{Decoder, KvCache};
use anyhow::{bail, Result};
use kernels::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is picked.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// Refuses settings that cannot sample: a temperature that is negative or not finite (0 is
    /// greedy), a `top_p` outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature {} must be a finite number ≥ 0 (0 = greedy decoding)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(
                "--top-p {} must be in (0, 1] (1 = the whole distribution)",
                self.top_p
            );
        }
        Ok(())
    }
}

/// Picks a token from one row of logits.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    if s.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, (((x - max) / s.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= s.top_p as f64 {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for p in nucleus {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    nucleus.last().map_or(0, |p| p.0 as u32)
}

/// Generates after `prompt`, calling `on_token` with each new id; stops at any of `stop` ids.
/// Returns the new ids (the stop token included when one was produced).
pub fn generate<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: Option<&LoraParams<B>>,
    prompt: &[u32],
    stop: &[u32],
    s: &Sampling,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    s.validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty (0 tokens): give some text with --prompt, or drop --raw to use the chat template");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let capacity = prompt.len() + s.max_new_tokens;
    let mut cache = KvCache::new(be, model, vec![0], capacity.max(1))?;
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut logits = model.step_cached(be, lora, &ids, &mut cache)?;
    let mut out = Vec::new();
    for _ in 0..s.max_new_tokens {
        let next = pick(&logits, s, &mut rng);
        out.push(next);
        on_token(next)?;
        if stop.contains(&next) || out.len() == s.max_new_tokens {
            break;
        }
        logits = model.step_cached(be, lora, &[next as i32], &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_sample_are_refused_by_flag() {
        let ok = Sampling {
            max_new_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        ok.validate().unwrap();
        for t in [f32::NAN, -1.0, f32::INFINITY] {
            let e = Sampling {
                temperature: t,
                ..ok.clone()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("--temperature") && e.contains("≥ 0"), "{e}");
        }
        for p in [0.0, 2.0, f32::NAN] {
            let e = Sampling {
                top_p: p,
                ..ok.clone()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("--top-p") && e.contains("(0, 1]"), "{e}");
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_keeps_the_nucleus() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = Sampling {
            max_new_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        assert_eq!(pick(&[0.1, 3.0, 3.0, -1.0], &greedy, &mut rng), 1);
        // p = softmax([ln 0.6, ln 0.3, ln 0.1]) = [0.6, 0.3, 0.1]; top_p 0.5 keeps only token 0.
        let nucleus = Sampling {
            max_new_tokens: 1,
            temperature: 1.0,
            top_p: 0.5,
            seed: 0,
        };
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        assert!((0..50).all(|_| pick(&logits, &nucleus, &mut rng) == 0));
        // With top_p 1 every token appears.
        let all = Sampling {
            top_p: 1.0,
            ..nucleus
        };
        let mut seen = [false; 3];
        (0..300).for_each(|_| seen[pick(&logits, &all, &mut rng) as usize] = true);
        assert_eq!(seen, [true; 3]);
    }
}
