//! The whole decoder (every family of [`crate::arch`]) over a backend: embedding → layers → final
//! RMSNorm → LM head, with the loss and the backward pass.
//! With gradient checkpointing only each layer's input is kept on the device, or offloaded to host
//! memory with the layer's attention output, log-sum-exp, residual, v (or k and v) and LoRA inputs;
//! backward recomputes the rest of the layer forward (Chen et al. 2016) and so produces the same
//! gradients bit for bit.

use super::batch::Batch;
use super::bnb_checkpoint;
use super::checkpointing::{CheckpointPolicy, Checkpointing, KeptKv};
use super::hooks::{LayerHooks, NoHooks};
use super::layer::{
    Attend, CheckpointKeeps, CheckpointShape, InputGradient, LayerCheckpoint, LayerSaved,
    LayerWeights, Shapes,
};
use super::linear::FrozenLinear;
use super::proj_weight::{Nf4Tensor, ProjWeight, QuantizeNf4};
use crate::arch::{HeadNorm, ModelConfig, Projection};
use crate::lora::{LoraConfig, LoraParams};
use crate::weights::WeightFiles;
use anyhow::{anyhow, bail, Result};
use kernels::{Backend, CeGrad, DType, ParkLane};

/// The decoder's frozen weights.
pub struct Decoder<B: Backend> {
    pub config: ModelConfig,
    pub(super) shapes: Shapes,
    pub(super) embed: Embedding<B>,
    pub(super) layers: Vec<LayerWeights<B>>,
    pub(super) final_norm: B::Tensor,
    /// `None` when the LM head is tied to the embedding.
    pub(super) lm_head: Option<B::Tensor>,
}

/// The input embedding table `[vocab, hidden]`: on the device, or in host memory with each
/// batch's rows gathered there (`model.embedding = "host"`; an untied table only, as the LM head
/// reads a tied one).
pub(super) enum Embedding<B: Backend> {
    Device(B::Tensor),
    Host(B::Parked),
}

impl<B: Backend> Embedding<B> {
    /// `out[i,:] ← table[ids[i],:]` wherever the table is.
    pub(super) fn rows(
        &self,
        be: &B,
        ids: &B::Indices,
        hidden: usize,
        out: &mut B::Tensor,
    ) -> Result<()> {
        match self {
            Embedding::Device(table) => be.embedding(table, ids, hidden, out)?,
            Embedding::Host(table) => be.embedding_from_host(table, ids, hidden, out)?,
        }
        Ok(())
    }
}

/// What a forward pass keeps for backward.
pub struct Activations<B: Backend> {
    /// Per layer: everything, or only the input when checkpointing.
    layers: Vec<Saved<B>>,
    /// Output of the last layer, before the final norm `[N, hidden]`.
    last: B::Tensor,
    final_rstd: B::Tensor,
    /// After the final norm `[N, hidden]`: the LM head's input.
    pub normed: B::Tensor,
}

enum Saved<B: Backend> {
    Full(LayerSaved<B>),
    Checkpoint(LayerCheckpoint<B>),
    /// The layer's checkpoint in host memory ([`Checkpointing::Offload`]).
    Parked(B::Parked, CheckpointShape),
}

impl<B: Backend> Decoder<B> {
    /// Loads the weights of a Hugging Face folder onto the backend (NF4 projections when the
    /// checkpoint is a bitsandbytes 4-bit one).
    pub fn load(be: &B, config: ModelConfig, files: &WeightFiles) -> Result<Self> {
        Self::load_with(be, config, files, None, None)
    }

    /// [`Decoder::load`], quantizing the projections of a dense checkpoint to NF4 when `quantize`
    /// asks (QLoRA); a 4-bit checkpoint keeps its own quantization. With `fold`, each layer is
    /// laid out for an adapter of that config as it loads ([`Decoder::fold_lora`]).
    pub fn load_with(
        be: &B,
        config: ModelConfig,
        files: &WeightFiles,
        quantize: Option<QuantizeNf4>,
        fold: Option<&LoraConfig>,
    ) -> Result<Self> {
        let tied = config.tie_word_embeddings && !files.contains("lm_head.weight");
        let checkpoint_4bit = bnb_checkpoint::quantization_of(&config.raw)?.is_some();
        crate::arch::validate::check_no_unused_tensors(&config, files.names(), checkpoint_4bit)?;
        let dt = be.compute_dtype();
        // A dense projection on the device: in the compute dtype, or in the dtype the file stores
        // it in when it is to be quantized (so the quantizer reads the stored values exactly and
        // writes the host quantizer's bytes); 16-bit files go up as their bits.
        let upload = |name: &str, shape: &[usize], as_stored: bool| -> Result<B::Tensor> {
            match files.bits_16(name, shape)? {
                Some((stored, bits)) => {
                    let bits = crate::arch::validate::finite_16bit(name, bits, stored)?;
                    Ok(be.upload_16bit(&bits, stored, if as_stored { stored } else { dt })?)
                }
                None => {
                    let values = crate::arch::validate::finite(name, files.f32(name, shape)?)?;
                    Ok(be.upload(&values, if as_stored { DType::F32 } else { dt })?)
                }
            }
        };
        let proj = |name: &str, [o, i]: [usize; 2]| -> Result<ProjWeight<B>> {
            let stored_4bit =
                checkpoint_4bit && files.contains(&format!("{name}.quant_state.bitsandbytes__nf4"));
            if stored_4bit {
                let w = bnb_checkpoint::read_nf4(files, name, [o, i])?;
                return Ok(ProjWeight::nf4(Nf4Tensor::upload(be, &w)?));
            }
            // Only one dense projection is on the device at a time: from_dense frees it once quantized.
            ProjWeight::from_dense(be, upload(name, &[o, i], quantize.is_some())?, quantize)
        };
        Self::build(
            be,
            config,
            tied,
            |name, shape| crate::arch::validate::finite(name, files.f32(name, shape)?),
            proj,
            fold,
        )
    }

    /// Builds the decoder from any source of named f32 tensors (`source(name, shape)`), with the
    /// LM head tied to the embedding when `tied`.
    pub fn from_source(
        be: &B,
        config: ModelConfig,
        tied: bool,
        source: impl Fn(&str, &[usize]) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let dense = |name: &str, [o, i]: [usize; 2]| -> Result<ProjWeight<B>> {
            ProjWeight::from_dense(
                be,
                be.upload(&source(name, &[o, i])?, be.compute_dtype())?,
                None,
            )
        };
        Self::build(be, config, tied, &source, dense, None)
    }

    /// Builds the decoder: norms, embedding and LM head from `source`, projections from `proj`,
    /// each layer folded for `fold` as soon as it is made.
    fn build(
        be: &B,
        config: ModelConfig,
        tied: bool,
        source: impl Fn(&str, &[usize]) -> Result<Vec<f32>>,
        proj: impl Fn(&str, [usize; 2]) -> Result<ProjWeight<B>>,
        fold: Option<&LoraConfig>,
    ) -> Result<Self> {
        let dt = be.compute_dtype();
        let c = &config;
        let get = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            Ok(be.upload(&source(name, shape)?, dt)?)
        };
        let embed = get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let frozen = |p: Projection| -> Result<FrozenLinear<B>> {
                let (o, i) = p.shape(c);
                Ok(FrozenLinear {
                    weight: proj(&p.weight_name(l), [o, i])?,
                    bias: match c.has_bias(p) {
                        true => Some(get(&p.bias_name(l), &[o])?),
                        false => None,
                    },
                })
            };
            let [q, k, v, o, gate, up, down] = Projection::ALL.map(frozen);
            let qk_norm = match c.qk_norm {
                true => Some([
                    get(&HeadNorm::Q.weight_name(l), &[c.head_dim])?,
                    get(&HeadNorm::K.weight_name(l), &[c.head_dim])?,
                ]),
                false => None,
            };
            layers.push(LayerWeights {
                input_norm: get(
                    &format!("model.layers.{l}.input_layernorm.weight"),
                    &[c.hidden_size],
                )?,
                post_attention_norm: get(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                )?,
                proj: [q?, k?, v?, o?, gate?, up?, down?],
                qk_norm,
            });
            if let Some(f) = fold {
                // The unpadded copies freed here are the next layer's uploads' buffers.
                let layer = layers.last_mut().expect("pushed");
                layer.fold_lora(be, &Shapes::of(c), f)?;
            }
        }
        be.release_cached()?;
        let final_norm = get("model.norm.weight", &[c.hidden_size])?;
        let lm_head = if tied {
            None
        } else {
            Some(get("lm_head.weight", &[c.vocab_size, c.hidden_size])?)
        };
        Ok(Decoder {
            shapes: Shapes::of(c),
            config,
            embed: Embedding::Device(embed),
            layers,
            final_norm,
            lm_head,
        })
    }

    /// A decoder of `config`'s shape with random weights made on the device (benchmarks; no
    /// download): projections, biases and embeddings uniform with standard deviation 0.02
    /// (transformers' `initializer_range`), norm weights 1. Tensor `i` is filled from seed `seed + i`.
    /// With `quantize`, each projection is quantized to NF4 as soon as it is made; with `fold`,
    /// each layer is laid out for an adapter of that config ([`Decoder::fold_lora`]).
    pub fn random(
        be: &B,
        config: ModelConfig,
        seed: u64,
        quantize: Option<QuantizeNf4>,
        fold: Option<&LoraConfig>,
    ) -> Result<Self> {
        let dt = be.compute_dtype();
        let scale = 0.02 * 3f32.sqrt();
        let mut next_seed = seed;
        let mut random = |len: usize| -> Result<B::Tensor> {
            let mut t = be.zeros(len, dt)?;
            be.fill_random(&mut t, next_seed, scale)?;
            next_seed = next_seed.wrapping_add(1);
            Ok(t)
        };
        let c = &config;
        let embed = random(c.vocab_size * c.hidden_size)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        let ones = |len: usize| be.upload(&vec![1.0; len], dt);
        for _ in 0..c.num_layers {
            let [q, k, v, o, gate, up, down] = Projection::ALL.map(|p| {
                let (o, i) = p.shape(c);
                Ok::<_, anyhow::Error>(FrozenLinear {
                    weight: random(o * i).and_then(|w| ProjWeight::from_dense(be, w, quantize))?,
                    bias: match c.has_bias(p) {
                        true => Some(random(o)?),
                        false => None,
                    },
                })
            });
            let qk_norm = match c.qk_norm {
                true => Some([ones(c.head_dim)?, ones(c.head_dim)?]),
                false => None,
            };
            layers.push(LayerWeights {
                input_norm: ones(c.hidden_size)?,
                post_attention_norm: ones(c.hidden_size)?,
                proj: [q?, k?, v?, o?, gate?, up?, down?],
                qk_norm,
            });
            if let Some(f) = fold {
                let layer = layers.last_mut().expect("pushed");
                layer.fold_lora(be, &Shapes::of(c), f)?;
            }
        }
        be.release_cached()?;
        let final_norm = ones(c.hidden_size)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(random(c.vocab_size * c.hidden_size)?)
        };
        Ok(Decoder {
            shapes: Shapes::of(c),
            config,
            embed: Embedding::Device(embed),
            layers,
            final_norm,
            lm_head,
        })
    }

    pub(super) fn head_weight(&self) -> &B::Tensor {
        match (&self.lm_head, &self.embed) {
            (Some(head), _) => head,
            (None, Embedding::Device(table)) => table,
            (None, Embedding::Host(_)) => unreachable!("a tied embedding stays on the device"),
        }
    }

    /// Lays the weights out for folding the terms of an adapter of `lora` into the frozen
    /// products of every input group it fully adapts ([`LayerWeights::fold_lora`]): the dense
    /// weights of those groups are stored padded (`members · r` more columns each). A forward
    /// with another adapter, or none, still runs. On a device, fold at load instead
    /// ([`Decoder::load_with`], [`Decoder::random`]): afterwards the padded copies would sit
    /// between the freed unpadded ones, which the driver then cannot hand back whole.
    pub fn fold_lora(&mut self, be: &B, lora: &LoraConfig) -> Result<()> {
        for layer in &mut self.layers {
            layer.fold_lora(be, &self.shapes, lora)?;
        }
        Ok(be.release_cached()?)
    }

    /// Moves the input embedding table to host memory (`model.embedding = "host"`): the device
    /// saves `vocab × hidden` values, and each batch's rows are gathered on the host. Returns
    /// false, keeping it on the device, when the LM head is tied to it.
    pub fn keep_embedding_on_host(&mut self, be: &B) -> Result<bool> {
        if self.lm_head.is_none() {
            return Ok(false);
        }
        if let Embedding::Device(table) = &mut self.embed {
            let table = std::mem::replace(table, be.empty(0, be.compute_dtype())?);
            self.embed = Embedding::Host(be.park(vec![table], ParkLane::Activations)?);
            // The table's device buffer, cached by its size, would never be asked for again.
            be.release_cached()?;
        }
        Ok(true)
    }

    /// Runs every layer, keeping what `checkpointing` says for backward. Every layer's LoRA
    /// weights must be current (no optimizer update waits for a training forward).
    pub fn forward(
        &self,
        be: &B,
        lora: Option<&LoraParams<B>>,
        batch: &Batch<B>,
        checkpointing: CheckpointPolicy,
    ) -> Result<Activations<B>> {
        self.forward_layers(be, AdapterAccess::Read(lora), batch, checkpointing)
    }

    /// [`Decoder::forward`] with the adapter, calling `hooks.before_forward(l, lora)` right
    /// before each layer `l` runs (where a deferred optimizer update reaches that layer).
    pub fn forward_with_hooks(
        &self,
        be: &B,
        lora: &mut LoraParams<B>,
        batch: &Batch<B>,
        checkpointing: CheckpointPolicy,
        hooks: &mut dyn LayerHooks<B>,
    ) -> Result<Activations<B>> {
        self.forward_layers(be, AdapterAccess::Hooked(lora, hooks), batch, checkpointing)
    }

    fn forward_layers(
        &self,
        be: &B,
        mut lora: AdapterAccess<'_, B>,
        batch: &Batch<B>,
        checkpointing: CheckpointPolicy,
    ) -> Result<Activations<B>> {
        let s = &self.shapes;
        let n = batch.layout.tokens();
        let mut x = be.empty(n * s.hidden, be.compute_dtype())?;
        self.embed.rows(be, &batch.ids, s.hidden, &mut x)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        let offloaded = CheckpointKeeps::Attention(KeptKv::of(&self.config));
        for (l, layer) in self.layers.iter().enumerate() {
            // Checkpointing keeps the layer input (and, offloaded, the attention part, v or k and
            // v, and the LoRA inputs); the rest is recomputed in backward.
            let lora = lora.layer(l)?;
            let (y, full) = layer.forward(be, s, l, lora, Attend::Batch(batch), x)?;
            saved.push(match checkpointing.of_layer(l, self.layers.len()) {
                Checkpointing::Off => Saved::Full(full),
                Checkpointing::Full => Saved::Checkpoint(full.checkpoint(CheckpointKeeps::Input)?),
                Checkpointing::Offload => {
                    let (tensors, shape) = full.checkpoint(offloaded)?.into_tensors();
                    Saved::Parked(be.park(tensors, ParkLane::Activations)?, shape)
                }
            });
            x = y;
        }
        let mut final_rstd = be.empty(n, DType::F32)?;
        let mut normed = be.empty(n * s.hidden, be.compute_dtype())?;
        be.rms_norm(
            &x,
            &self.final_norm,
            s.hidden,
            s.eps,
            &mut normed,
            s.hidden,
            &mut final_rstd,
        )?;
        Ok(Activations {
            layers: saved,
            last: x,
            final_rstd,
            normed,
        })
    }

    /// Full logits `[N, vocab]` (for checks and generation; training uses [`Decoder::head`]).
    pub fn logits(&self, be: &B, acts: &Activations<B>) -> Result<B::Tensor> {
        let n = be.len(&acts.normed) / self.shapes.hidden;
        let v = self.config.vocab_size;
        let mut logits = be.zeros(n * v, DType::F32)?;
        be.gemm(
            n,
            v,
            self.shapes.hidden,
            1.0,
            &acts.normed,
            false,
            self.head_weight(),
            true,
            0.0,
            &mut logits,
        )?;
        Ok(logits)
    }

    /// Log-probabilities of `targets` under the model (`[N]` f32, 0 at ignored positions), and with a
    /// gradient request, `dL/d normed` for `L = −Σ weight · logp`.
    pub fn head(
        &self,
        be: &B,
        acts: &Activations<B>,
        targets: &B::Indices,
        grad: CeGrad<'_, B::Tensor>,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let s = &self.shapes;
        let n = be.len(&acts.normed) / s.hidden;
        let mut logp = be.zeros(n, DType::F32)?;
        let mut dnormed = match grad {
            CeGrad::None => None,
            _ => Some(be.zeros(n * s.hidden, be.compute_dtype())?),
        };
        be.lm_head_cross_entropy(
            &acts.normed,
            self.head_weight(),
            targets,
            n,
            s.hidden,
            self.config.vocab_size,
            grad,
            &mut logp,
            dnormed.as_mut(),
        )?;
        Ok((logp, dnormed))
    }

    /// Back-propagates `dnormed = dL/d normed` through every layer, adding into the LoRA gradients.
    pub fn backward(
        &self,
        be: &B,
        lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        acts: Activations<B>,
        dnormed: &B::Tensor,
    ) -> Result<()> {
        self.backward_with_hooks(be, lora, batch, acts, dnormed, &mut NoHooks)
    }

    /// [`Decoder::backward`], calling `hooks.after_backward(l, lora)` as soon as layer `l`'s LoRA
    /// gradients are complete (last layer first) — where data parallelism starts reducing them
    /// while the layers below are still back-propagating.
    pub fn backward_with_hooks(
        &self,
        be: &B,
        mut lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        acts: Activations<B>,
        dnormed: &B::Tensor,
        hooks: &mut dyn LayerHooks<B>,
    ) -> Result<()> {
        let s = &self.shapes;
        // dL/d(the top layer's output), then each layer's input gradient for the layer below
        // (none from the bottom layer: InputGradient).
        let mut dx = be.zeros(be.len(&acts.last), be.compute_dtype())?;
        be.rms_norm_backward(
            dnormed,
            &acts.last,
            &self.final_norm,
            &acts.final_rstd,
            s.hidden,
            &mut dx,
        )?;
        let mut saved = acts.layers;
        let mut from_above = Some(dx);
        while let Some(this) = saved.pop() {
            let l = saved.len();
            // The next layer down's offloaded input starts coming back while this layer runs.
            if let Some(Saved::Parked(below, _)) = saved.last_mut() {
                be.prefetch(below)?;
            }
            let layer = &self.layers[l];
            let lp = lora.as_deref_mut();
            let dy = from_above
                .take()
                .ok_or_else(|| anyhow!("layer {l}: the layer above made no input gradient"))?;
            let wanted = InputGradient::of_layer(l);
            from_above = match this {
                Saved::Full(f) => layer.backward(be, s, l, lp, batch, f, dy, wanted)?,
                Saved::Checkpoint(c) => {
                    layer.recompute_backward(be, s, l, lp, batch, c, dy, wanted)?
                }
                Saved::Parked(p, shape) => {
                    let c = LayerCheckpoint::from_tensors(be.unpark(p)?, shape)?;
                    layer.recompute_backward(be, s, l, lp, batch, c, dy, wanted)?
                }
            };
            if let Some(lp) = lora.as_deref_mut() {
                hooks.after_backward(l, lp)?;
            }
        }
        Ok(())
    }

    /// Forward, loss and (when `lora` is given) backward for one batch. Returns `Σ −logp` over the
    /// batch's targets and adds `d(grad_weight · Σ −logp)/dθ` into the LoRA gradients: the token-mean
    /// loss of a whole optimizer step uses `grad_weight = 1 / (targets in all its micro-batches)`.
    pub fn loss_and_grad(
        &self,
        be: &B,
        lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        checkpointing: CheckpointPolicy,
        grad_weight: f32,
    ) -> Result<f64> {
        self.loss_and_grad_with_hooks(be, lora, batch, checkpointing, grad_weight, &mut NoHooks)
    }

    /// [`Decoder::loss_and_grad`] with the per-layer hooks of [`Decoder::forward_with_hooks`]
    /// and [`Decoder::backward_with_hooks`].
    pub fn loss_and_grad_with_hooks(
        &self,
        be: &B,
        mut lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        checkpointing: CheckpointPolicy,
        grad_weight: f32,
        hooks: &mut dyn LayerHooks<B>,
    ) -> Result<f64> {
        let acts = match lora.as_deref_mut() {
            Some(lp) => self.forward_with_hooks(be, lp, batch, checkpointing, hooks)?,
            None => self.forward(be, None, batch, checkpointing)?,
        };
        let grad = if lora.is_some() {
            CeGrad::Scale(grad_weight)
        } else {
            CeGrad::None
        };
        let (logp, dnormed) = self.head(be, &acts, &batch.targets, grad)?;
        if let (Some(lp), Some(d)) = (lora, dnormed) {
            self.backward_with_hooks(be, Some(lp), batch, acts, &d, hooks)?;
        }
        // Read after the backward is queued, so the device never waits for the host mid-step.
        Ok(-be.download(&logp)?.iter().map(|&x| x as f64).sum::<f64>())
    }
}

/// How a forward reaches the adapter: as it is, or through a step's per-layer hooks.
enum AdapterAccess<'a, B: Backend> {
    Read(Option<&'a LoraParams<B>>),
    Hooked(&'a mut LoraParams<B>, &'a mut dyn LayerHooks<B>),
}

impl<B: Backend> AdapterAccess<'_, B> {
    /// The adapter for layer `l`'s forward (after its hook), whose weights must be current.
    fn layer(&mut self, l: usize) -> Result<Option<&LoraParams<B>>> {
        let lora = match self {
            AdapterAccess::Read(lora) => *lora,
            AdapterAccess::Hooked(lora, hooks) => {
                hooks.before_forward(l, lora)?;
                Some(&**lora)
            }
        };
        if lora.is_some_and(|lp| !lp.is_current(l)) {
            bail!(
                "layer {l}'s LoRA weights still wait for the last optimizer step's update, which \
                 was deferred into the next training forward: finish it first \
                 (AdamW::finish_update)"
            );
        }
        Ok(lora)
    }
}
