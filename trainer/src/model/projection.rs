//! The seven linear projections of a decoder layer, with their Hugging Face names and shapes.

use super::ModelConfig;

/// One of a layer's projections (the modules LoRA can target).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// PEFT's order of `target_modules` is irrelevant; ours is the order of the forward pass.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        Projection::ALL.iter().position(|&p| p == self).unwrap()
    }

    /// The module name used in `target_modules`: `q_proj`, …, `down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// Parses a `target_modules` entry.
    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }

    /// `model.layers.{layer}.self_attn.q_proj` etc.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.name())
    }

    /// `(out_features, in_features)` of the weight.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Projection::Q => (c.q_dim(), c.hidden_size),
            Projection::K | Projection::V => (c.kv_dim(), c.hidden_size),
            Projection::O => (c.hidden_size, c.q_dim()),
            Projection::Gate | Projection::Up => (c.intermediate_size, c.hidden_size),
            Projection::Down => (c.hidden_size, c.intermediate_size),
        }
    }
}
