//! Rotary position embedding tables (transformers' `modeling_rope_utils`, f32 as there).
//!
//! `inv_freq[i] = theta^(-2i/d)` for `i < d/2`, then adjusted by the scaling kind; the tables hold
//! `cos(p · inv_freq[i]) · attention_factor` and the same for `sin`, one row per position `p`.

use std::f64::consts::PI;

/// The `rope_scaling` / `rope_parameters` kinds we implement.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// Dynamic NTK: the base grows once the sequence outruns `max_position_embeddings`.
    Dynamic {
        factor: f32,
        max_position_embeddings: usize,
    },
    /// Llama 3.1: low frequencies divided by `factor`, a smooth ramp between the two wavelengths.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Everything needed to build a table: theta, head_dim and the scaling kind.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub head_dim: usize,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// `inv_freq [head_dim/2]` for a batch whose longest sequence is `seq_len` tokens.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let d = self.head_dim;
        let base_freqs = |theta: f32| -> Vec<f32> {
            // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
            (0..d / 2)
                .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / d as f32))
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => base_freqs(self.theta),
            RopeScaling::Linear { factor } => base_freqs(self.theta)
                .into_iter()
                .map(|f| f / factor)
                .collect(),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let max = *max_position_embeddings;
                if seq_len <= max {
                    return base_freqs(self.theta);
                }
                // base' = base · ((factor · L / L_max) − (factor − 1))^(d / (d − 2))
                let ratio = factor * seq_len as f32 / max as f32 - (factor - 1.0);
                let theta = self.theta * ratio.powf(d as f32 / (d as f32 - 2.0));
                base_freqs(theta)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base_freqs(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * PI as f32 / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers' `~(wavelen < high) & ~(wavelen > low)`, NaN included.
                        #[allow(clippy::neg_cmp_op_on_partial_ord)]
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// `(cos, sin)`, each `[positions, head_dim/2]` row-major, for positions `0..positions`.
    pub fn tables(&self, positions: usize, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
        let inv = self.inv_freq(seq_len);
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv {
                // transformers forms the angle as an f32 product p · inv_freq.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_theta() {
        let c = RopeConfig {
            theta: 10000.0,
            head_dim: 4,
            scaling: RopeScaling::Default,
        };
        let f = c.inv_freq(8);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.01).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let d = RopeConfig {
            theta: 10000.0,
            head_dim: 8,
            scaling: RopeScaling::Default,
        }
        .inv_freq(8);
        let l = RopeConfig {
            theta: 10000.0,
            head_dim: 8,
            scaling: RopeScaling::Linear { factor: 2.0 },
        }
        .inv_freq(8);
        for (a, b) in d.iter().zip(&l) {
            assert_eq!(a / 2.0, *b);
        }
    }

    #[test]
    fn dynamic_scaling_only_acts_past_the_trained_length() {
        let c = RopeConfig {
            theta: 10000.0,
            head_dim: 8,
            scaling: RopeScaling::Dynamic {
                factor: 2.0,
                max_position_embeddings: 16,
            },
        };
        let plain = RopeConfig {
            theta: 10000.0,
            head_dim: 8,
            scaling: RopeScaling::Default,
        }
        .inv_freq(16);
        assert_eq!(c.inv_freq(16), plain);
        let long = c.inv_freq(32);
        // base' = 10000 · (2·32/16 − 1)^(8/6) = 10000 · 3^(4/3)
        let theta = 10000.0f32 * 3.0f32.powf(8.0 / 6.0);
        assert!((long[1] - 1.0 / theta.powf(2.0 / 8.0)).abs() < 1e-7);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let c = RopeConfig {
            theta: 500000.0,
            head_dim: 128,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let base = RopeConfig {
            theta: 500000.0,
            head_dim: 128,
            scaling: RopeScaling::Default,
        }
        .inv_freq(1);
        let f = c.inv_freq(1);
        assert_eq!(f[0], base[0]); // wavelength 2π < 2048: untouched
        assert_eq!(f[63], base[63] / 8.0); // wavelength far beyond 8192: divided
        let mid = (0..64).find(|&i| f[i] != base[i] && f[i] != base[i] / 8.0);
        assert!(
            mid.is_some(),
            "a smooth band exists between the two wavelengths"
        );
    }
}
