//! The seven linear projections of a decoder layer, with their Hugging Face names and shapes.

use super::ModelConfig;

/// The two halves of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// `self_attn`: q, k, v, o.
    Attention,
    /// `mlp`: gate, up, down.
    Mlp,
}

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

    /// The projections that read the same input as this one.
    pub fn input_group(self) -> InputGroup {
        match self {
            Projection::Q | Projection::K | Projection::V => InputGroup::Qkv,
            Projection::O => InputGroup::O,
            Projection::Gate | Projection::Up => InputGroup::GateUp,
            Projection::Down => InputGroup::Down,
        }
    }

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

    /// Which half of the layer the projection belongs to.
    pub fn block(self) -> Block {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => Block::Attention,
            Projection::Gate | Projection::Up | Projection::Down => Block::Mlp,
        }
    }

    /// `model.layers.{layer}.self_attn.q_proj` etc.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self.block() {
            Block::Attention => "self_attn",
            Block::Mlp => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.name())
    }

    /// The weight tensor, `[out, in]`: `model.layers.{layer}.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("{}.weight", self.module_path(layer))
    }

    /// The bias tensor, `[out]` (families that have one): `model.layers.{layer}.self_attn.q_proj.bias`.
    pub fn bias_name(self, layer: usize) -> String {
        format!("{}.bias", self.module_path(layer))
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

/// Projections that read one input: q, k and v the normed layer input, gate and up the normed
/// residual; o and down each their own. LoRA's `x Aᵀ` of a group is one product with the
/// members' A stacked (`t = x [A_q; A_k; A_v]ᵀ`), and so is its `dx += s · u [A_q; A_k; A_v]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGroup {
    Qkv,
    O,
    GateUp,
    Down,
}

impl InputGroup {
    /// In the order of the forward pass.
    pub const ALL: [InputGroup; 4] = [
        InputGroup::Qkv,
        InputGroup::O,
        InputGroup::GateUp,
        InputGroup::Down,
    ];

    /// Position in [`InputGroup::ALL`].
    pub fn index(self) -> usize {
        InputGroup::ALL.iter().position(|&g| g == self).unwrap()
    }

    /// The projections of the group, in [`Projection::ALL`] order.
    pub fn members(self) -> &'static [Projection] {
        match self {
            InputGroup::Qkv => &[Projection::Q, Projection::K, Projection::V],
            InputGroup::O => &[Projection::O],
            InputGroup::GateUp => &[Projection::Gate, Projection::Up],
            InputGroup::Down => &[Projection::Down],
        }
    }
}

/// The per-head RMSNorm weights of q and k (Qwen3), `[head_dim]` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadNorm {
    Q,
    K,
}

impl HeadNorm {
    /// `model.layers.{layer}.self_attn.q_norm.weight` / `k_norm`.
    pub fn weight_name(self, layer: usize) -> String {
        let which = match self {
            HeadNorm::Q => "q_norm",
            HeadNorm::K => "k_norm",
        };
        format!("model.layers.{layer}.self_attn.{which}.weight")
    }
}
