//! What a layer's forward keeps for its backward (`train.gradient_checkpointing`).

use crate::arch::{ModelConfig, Projection};
use serde::{Deserialize, Deserializer, Serialize};

/// Activation checkpointing of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation stays on the device until backward: no recomputation, the most memory.
    Off,
    /// Only each layer's input stays; backward runs the layer's forward again first (a third
    /// more compute, activations of one layer at a time).
    Full,
    /// As `Full`, with each layer's input, attention output, log-sum-exp and attention residual
    /// (and the v, or k and v, projections' outputs: [`KeptKv`]) in pinned host memory: copied
    /// out on a second stream during the forward and back one layer ahead during the backward, so
    /// the device holds two layers' of them instead of every layer's input, and the recomputation
    /// skips attention, the o projection and the kept projections (faster than `Full` while the
    /// host link keeps up: (3 × hidden + kept) × 2 bytes per token per layer each way).
    Offload,
}

/// Which of the k and v projections' outputs an offloaded checkpoint keeps, so that the
/// recomputation skips their GEMMs. Each costs `kv_dim × 2` bytes per token of the host link, which
/// is only free while the link keeps up with the forward. Measured on an H200 (docs/benchmarks.md,
/// session 12): at Llama-2-7B's shape (kv_dim = hidden) keeping one of them was faster than keeping
/// neither and keeping both was slower than one; at Mistral-7B's (kv_dim = hidden / 4) keeping both
/// was faster than keeping neither. Where one is kept it is k, after RoPE (all its backward needs):
/// the same bytes as v, and its recomputation is a GEMM and a RoPE pass where v's is a GEMM alone —
/// unless the family normalises k per head (Qwen3): then its pre-norm value would be needed too,
/// and only v is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptKv {
    K,
    V,
    KV,
}

impl KeptKv {
    /// What an offloaded checkpoint of `c` keeps.
    pub fn of(c: &ModelConfig) -> KeptKv {
        match (c.qk_norm, 4 * c.kv_dim() <= c.hidden_size) {
            (true, _) => KeptKv::V,
            (false, true) => KeptKv::KV,
            (false, false) => KeptKv::K,
        }
    }

    /// The values an offloaded checkpoint of `c` holds per token: `(in the compute dtype, in
    /// f32)` — the input, attention output, residual, kept k/v and the LoRA inputs (`lora_t`: the
    /// adapted projections times the rank); the log-sum-exp per head.
    pub fn checkpoint_values_per_token(c: &ModelConfig, lora_t: usize) -> (usize, usize) {
        let kept = KeptKv::of(c).projections().len() * c.kv_dim();
        (2 * c.hidden_size + c.q_dim() + kept + lora_t, c.num_heads)
    }

    /// The kept projections (not recomputed).
    pub fn projections(self) -> &'static [Projection] {
        match self {
            KeptKv::K => &[Projection::K],
            KeptKv::V => &[Projection::V],
            KeptKv::KV => &[Projection::K, Projection::V],
        }
    }

    /// Whether k (after RoPE) is kept.
    pub fn keeps_k(self) -> bool {
        self != KeptKv::V
    }

    /// Whether v is kept.
    pub fn keeps_v(self) -> bool {
        self != KeptKv::K
    }
}

impl Checkpointing {
    /// Whether backward recomputes each layer's forward.
    pub fn recomputes(self) -> bool {
        self != Checkpointing::Off
    }

    /// The projections a recomputed layer of `c` does not run again: the down projection (its
    /// output went to the layer above), and offloaded also o and the kept k/v ([`KeptKv`]).
    pub fn not_recomputed(self, c: &ModelConfig) -> Vec<Projection> {
        let mut skipped = vec![Projection::Down];
        if self == Checkpointing::Offload {
            skipped.push(Projection::O);
            skipped.extend_from_slice(KeptKv::of(c).projections());
        }
        skipped
    }

    /// The projections whose NF4 dense copies a recomputed layer of `c` keeps from its
    /// recomputation for its backward (model/proj_weight.rs `Dequantized::KeptForNext`): gate and
    /// up, and offloaded the recomputed ones of q, k and v (model/layer.rs decides it there).
    pub fn dense_kept_for_backward(self, c: &ModelConfig) -> Vec<Projection> {
        let mut kept = vec![Projection::Gate, Projection::Up];
        if self == Checkpointing::Offload {
            let skipped = self.not_recomputed(c);
            kept.extend(
                [Projection::Q, Projection::K, Projection::V]
                    .into_iter()
                    .filter(|p| !skipped.contains(p)),
            );
        }
        kept
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::Off => "off",
            Checkpointing::Full => "full",
            Checkpointing::Offload => "offload",
        }
    }
}

/// What the forward keeps, layer by layer: `mode` for the first `layers` layers (all of them when
/// `None`) but the model's top layer; the layers above keep every activation (their backward runs
/// first, and they are not recomputed: each one traded costs its activations' memory and saves its
/// recomputation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointPolicy {
    pub mode: Checkpointing,
    pub layers: Option<usize>,
}

impl CheckpointPolicy {
    /// Every activation kept (evaluation, references, forwards without backward).
    pub const OFF: CheckpointPolicy = CheckpointPolicy {
        mode: Checkpointing::Off,
        layers: None,
    };

    /// A forward with no backward after it (evaluation, reference log-probabilities): each layer
    /// keeps only its input, as under full checkpointing, so an evaluation never needs more memory
    /// than the training step (nothing is recomputed: no backward runs).
    pub const FORWARD_ONLY: CheckpointPolicy = CheckpointPolicy {
        mode: Checkpointing::Full,
        layers: None,
    };

    /// `mode` for every layer.
    pub fn all(mode: Checkpointing) -> Self {
        CheckpointPolicy { mode, layers: None }
    }

    /// What layer `l` of `num_layers` keeps. The top layer keeps every activation in every mode:
    /// its backward runs right after the LM head, so recomputing it would only rebuild, at that
    /// moment, the activations that keeping them holds — the peak is the same, the recomputation
    /// is saved (and no checkpoint of it is waited for: session 17). What keeping costs is those
    /// activations living through the LM head, whose logit gradient shares the logits' buffer so
    /// that nothing is added there (kernels/src/cuda/lm_head.rs).
    pub fn of_layer(self, l: usize, num_layers: usize) -> Checkpointing {
        match self.layers {
            _ if l + 1 >= num_layers => Checkpointing::Off,
            Some(n) if l >= n => Checkpointing::Off,
            _ => self.mode,
        }
    }

    /// How many of `num_layers` layers keep what `keeps` says ([`CheckpointPolicy::of_layer`]).
    fn count(self, num_layers: usize, keeps: impl Fn(Checkpointing) -> bool) -> usize {
        (0..num_layers)
            .filter(|&l| keeps(self.of_layer(l, num_layers)))
            .count()
    }

    /// How many of `num_layers` layers park their checkpoints in host memory: the offloaded ones.
    pub fn parked_layers(self, num_layers: usize) -> usize {
        self.count(num_layers, |c| c == Checkpointing::Offload)
    }

    /// How many of `num_layers` layers are recomputed in backward (never the top one).
    pub fn recomputed_layers(self, num_layers: usize) -> usize {
        self.count(num_layers, Checkpointing::recomputes)
    }

    /// `full`, `off`, `offload` (every layer but the top one, which always keeps its activations),
    /// or `offload (layers 0-19; 20-31 keep activations)` for a model of `num_layers`.
    pub fn describe(self, num_layers: usize) -> String {
        match self.recomputed_layers(num_layers) {
            0 => "off".to_string(),
            n if n + 1 >= num_layers => self.mode.name().to_string(),
            n => format!(
                "{} (layers 0-{}; {}-{} keep activations)",
                self.mode.name(),
                n - 1,
                n,
                num_layers - 1
            ),
        }
    }
}

/// `train.gradient_checkpointing` as written: one mode for every layer, or `"auto"`: the
/// checkpointed mode the backend runs fastest (`offload` on a GPU, `full` on the CPU) for as few
/// layers as the memory needs, chosen at start-up from the plan (`fuselora plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointingSetting {
    Auto,
    #[serde(untagged)]
    Mode(Checkpointing),
}

impl<'de> Deserialize<'de> for CheckpointingSetting {
    /// What [`Checkpointing`] reads, and `"auto"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Spelling::deserialize(d)? {
            Spelling::Name(name) if name == "auto" => Ok(CheckpointingSetting::Auto),
            other => other
                .mode()
                .map(CheckpointingSetting::Mode)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// How a config spells checkpointing.
#[derive(Deserialize)]
#[serde(untagged)]
enum Spelling {
    Flag(bool),
    Name(String),
}

impl Spelling {
    fn mode(self) -> Result<Checkpointing, String> {
        match self {
            Spelling::Flag(true) => Ok(Checkpointing::Full),
            Spelling::Flag(false) => Ok(Checkpointing::Off),
            Spelling::Name(name) => match name.as_str() {
                "full" => Ok(Checkpointing::Full),
                "off" => Ok(Checkpointing::Off),
                "offload" => Ok(Checkpointing::Offload),
                other => Err(format!(
                    "unknown checkpointing {other:?}: use \"auto\", true (or \"full\"), false (or \"off\"), or \"offload\""
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    /// `true`/`false` (the Hugging Face spelling) or one of the names.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spelling::deserialize(d)?
            .mode()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::{CheckpointPolicy, Checkpointing, CheckpointingSetting};

    #[derive(serde::Deserialize, serde::Serialize)]
    struct T<C> {
        c: C,
    }

    fn parse<C: serde::de::DeserializeOwned>(v: &str) -> Result<C, String> {
        toml::from_str::<T<C>>(&format!("c = {v}"))
            .map(|t| t.c)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn booleans_and_names_parse_and_others_are_refused_with_the_list() {
        assert_eq!(parse("true"), Ok(Checkpointing::Full));
        assert_eq!(parse("false"), Ok(Checkpointing::Off));
        assert_eq!(parse("\"full\""), Ok(Checkpointing::Full));
        assert_eq!(parse("\"off\""), Ok(Checkpointing::Off));
        assert_eq!(parse("\"offload\""), Ok(Checkpointing::Offload));
        let e = parse::<Checkpointing>("\"selective\"").unwrap_err();
        assert!(
            e.contains("\"selective\"") && e.contains("\"offload\""),
            "{e}"
        );
        assert!(!Checkpointing::Off.recomputes() && Checkpointing::Offload.recomputes());
    }

    #[test]
    fn the_setting_reads_auto_and_every_mode_and_writes_them_back() {
        use CheckpointingSetting::{Auto, Mode};
        assert_eq!(parse("\"auto\""), Ok(Auto));
        assert_eq!(parse("true"), Ok(Mode(Checkpointing::Full)));
        assert_eq!(parse("\"offload\""), Ok(Mode(Checkpointing::Offload)));
        let e = parse::<CheckpointingSetting>("\"some\"").unwrap_err();
        assert!(e.contains("\"auto\""), "{e}");
        for (setting, written) in [(Auto, "\"auto\""), (Mode(Checkpointing::Off), "\"off\"")] {
            let text = toml::to_string(&T { c: setting }).unwrap();
            assert_eq!(text.trim(), format!("c = {written}"));
        }
    }

    #[test]
    fn a_policy_checkpoints_its_first_layers_and_names_the_rest() {
        let p = CheckpointPolicy {
            mode: Checkpointing::Offload,
            layers: Some(20),
        };
        assert_eq!(p.of_layer(19, 32), Checkpointing::Offload);
        assert_eq!(p.of_layer(20, 32), Checkpointing::Off);
        assert_eq!(p.recomputed_layers(32), 20);
        assert_eq!(
            p.describe(32),
            "offload (layers 0-19; 20-31 keep activations)"
        );
        // The top layer keeps its activations in every mode.
        assert_eq!(p.of_layer(19, 20), Checkpointing::Off);
        assert_eq!(
            (p.recomputed_layers(20), p.describe(20)),
            (19, "offload".into())
        );
        assert_eq!(p.recomputed_layers(1), 0);
        // Offloaded layers park their checkpoints.
        assert_eq!(p.parked_layers(32), 20);
        let every = CheckpointPolicy::all(Checkpointing::Offload);
        assert_eq!(every.of_layer(31, 32), Checkpointing::Off);
        assert_eq!(every.parked_layers(32), 31);
        assert_eq!(
            CheckpointPolicy::all(Checkpointing::Full).parked_layers(32),
            0
        );
        let all = CheckpointPolicy::all(Checkpointing::Full);
        assert_eq!(
            (all.describe(32), all.recomputed_layers(32)),
            ("full".into(), 31)
        );
        let none = CheckpointPolicy {
            layers: Some(0),
            ..p
        };
        assert_eq!(
            (none.describe(32), none.recomputed_layers(32)),
            ("off".into(), 0)
        );
        assert_eq!(CheckpointPolicy::OFF.recomputed_layers(32), 0);
    }
}
