//! What a layer's forward keeps for its backward (`train.gradient_checkpointing`).

use serde::{Deserialize, Deserializer, Serialize};

/// Activation checkpointing. In a config: `true` or `"full"`, `false` or `"off"`, `"offload"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation stays on the device until backward: no recomputation, the most memory.
    Off,
    /// Only each layer's input stays; backward runs the layer's forward again first (a third
    /// more compute, activations of one layer at a time).
    Full,
    /// As `Full`, with each layer's input, attention output, log-sum-exp and attention residual
    /// in pinned host memory: copied out on a second stream during the forward and back one layer
    /// ahead during the backward, so the device holds two layers' of them instead of every layer's
    /// input, and the recomputation skips attention and the o projection (faster than `Full`
    /// while the host link keeps up: 3 × hidden × 2 bytes per token per layer each way).
    Offload,
}

impl Checkpointing {
    /// Whether backward recomputes each layer's forward.
    pub fn recomputes(self) -> bool {
        self != Checkpointing::Off
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

impl<'de> Deserialize<'de> for Checkpointing {
    /// `true`/`false` (the Hugging Face spelling) or one of the names.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Flag(bool),
            Name(String),
        }
        match Value::deserialize(d)? {
            Value::Flag(true) => Ok(Checkpointing::Full),
            Value::Flag(false) => Ok(Checkpointing::Off),
            Value::Name(name) => match name.as_str() {
                "full" => Ok(Checkpointing::Full),
                "off" => Ok(Checkpointing::Off),
                "offload" => Ok(Checkpointing::Offload),
                other => Err(serde::de::Error::custom(format!(
                    "unknown checkpointing {other:?}: use true (or \"full\"), false (or \"off\"), or \"offload\""
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Checkpointing;

    #[derive(serde::Deserialize)]
    struct T {
        c: Checkpointing,
    }

    fn parse(v: &str) -> Result<Checkpointing, String> {
        toml::from_str::<T>(&format!("c = {v}"))
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
        let e = parse("\"selective\"").unwrap_err();
        assert!(
            e.contains("\"selective\"") && e.contains("\"offload\""),
            "{e}"
        );
        assert!(!Checkpointing::Off.recomputes() && Checkpointing::Offload.recomputes());
    }
}
