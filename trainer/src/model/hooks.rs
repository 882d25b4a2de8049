//! What a training step runs around each layer of a micro-batch's forward and backward: the
//! previous optimizer step's update of the layer's LoRA weights when it was deferred into this
//! forward (`crate::optim::UpdateTiming::InNextForward`), and the sum of the layer's gradients
//! over the ranks as soon as they are final (`crate::train::distributed`).

use crate::lora::LoraParams;
use anyhow::Result;
use kernels::Backend;

/// Per-layer calls of [`crate::model::Decoder::forward_with_hooks`] and
/// [`crate::model::Decoder::backward_with_hooks`].
pub trait LayerHooks<B: Backend> {
    /// Right before layer `layer`'s forward: after it, the layer's LoRA weights must be current
    /// ([`LoraParams::is_current`]).
    fn before_forward(&mut self, layer: usize, lora: &mut LoraParams<B>) -> Result<()>;
    /// As soon as layer `layer`'s LoRA gradients are final (last layer first).
    fn after_backward(&mut self, layer: usize, lora: &mut LoraParams<B>) -> Result<()>;
}

/// No per-layer work: every weight is current, gradients need no reduction.
pub struct NoHooks;

impl<B: Backend> LayerHooks<B> for NoHooks {
    fn before_forward(&mut self, _layer: usize, _lora: &mut LoraParams<B>) -> Result<()> {
        Ok(())
    }

    fn after_backward(&mut self, _layer: usize, _lora: &mut LoraParams<B>) -> Result<()> {
        Ok(())
    }
}
