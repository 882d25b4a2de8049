//! The fused LM head + cross-entropy, chunked over rows: per chunk, cuBLAS writes f32 logits
//! `z = h Wᵀ` for `chunk` rows, `softmax_cross_entropy` (kernels/cuda/cross_entropy.cu) turns them
//! into log-probabilities and the logit gradient `dz` (compute dtype, written over the logits:
//! each row where its logits start), and cuBLAS adds nothing but writes `dh = dz W` for those
//! rows. Only `[chunk, vocab]` f32 logits ever exist, and nothing beside them.

use super::gemm::Operand;
use super::launch::Arg;
use super::{suffix, CudaBackend, CudaIndices, CudaTensor};
use crate::error::check_len;
use crate::{lm_head_chunk_rows, CeGrad, DType, KernelError, Result, IGNORE_INDEX};

/// Factor the stored logit gradient carries (a power of two, so exact): keeps f16 out of subnormals.
const GRAD_GAIN: f32 = 1024.0;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lm_head_cross_entropy_impl(
        &self,
        hidden: &CudaTensor,
        weight: &CudaTensor,
        targets: &CudaIndices,
        rows: usize,
        hidden_dim: usize,
        vocab: usize,
        grad: CeGrad<'_, CudaTensor>,
        logp: &mut CudaTensor,
        dhidden: Option<&mut CudaTensor>,
    ) -> Result<()> {
        let op = "lm_head_cross_entropy";
        check_len(op, "hidden", hidden.len(), rows * hidden_dim)?;
        check_len(op, "weight", weight.len(), vocab * hidden_dim)?;
        check_len(op, "targets", targets.len(), rows)?;
        check_len(op, "logp", logp.len(), rows)?;
        let dt = self.same_dtype(op, &[("hidden", hidden), ("weight", weight)])?;
        self.require_dtype(op, "logp", logp, DType::F32)?;
        if let CeGrad::PerRow(w) = &grad {
            check_len(op, "row weights", w.len(), rows)?;
            self.require_dtype(op, "row weights", w, DType::F32)?;
        }
        if let Some(d) = &dhidden {
            check_len(op, "dhidden", d.len(), rows * hidden_dim)?;
            self.require_dtype(op, "dhidden", d, dt)?;
            if matches!(grad, CeGrad::None) {
                return Err(KernelError::Unsupported(format!(
                    "{op}: dhidden was asked for with CeGrad::None; pass CeGrad::Scale or CeGrad::PerRow"
                )));
            }
        }
        if let Some(&t) = targets
            .host("cross-entropy")?
            .iter()
            .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
        {
            return Err(KernelError::Unsupported(format!(
                "cross-entropy: target id {t} outside the vocabulary of {vocab}"
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let want_grad = !matches!(grad, CeGrad::None);
        let (row_weights, scale) = match &grad {
            CeGrad::None => (0u64, 0.0f32),
            CeGrad::Scale(s) => (0u64, *s),
            CeGrad::PerRow(w) => (w.ptr(&self.stream), 1.0),
        };
        // dz is stored as GRAD_GAIN · (softmax − onehot) · (weight / scale); the second GEMM's
        // alpha = scale / GRAD_GAIN restores it (see cross_entropy.cu).
        let gain = if scale != 0.0 {
            GRAD_GAIN / scale
        } else {
            GRAD_GAIN
        };
        let alpha = if scale != 0.0 {
            scale / GRAD_GAIN
        } else {
            1.0 / GRAD_GAIN
        };
        let chunk = lm_head_chunk_rows(rows, vocab);
        let logits = self.alloc_f32_scratch(chunk * vocab)?;
        let (h_ptr, w_ptr, t_ptr, lp_ptr) = (
            hidden.ptr(&self.stream),
            weight.ptr(&self.stream),
            targets.ptr(&self.stream),
            logp.ptr(&self.stream),
        );
        // dz's rows lie where the f32 logits' rows start: `vocab` f32s apart.
        let dz_ld = vocab * 4 / dt.size_bytes();
        let dh = dhidden.map(|d| (d.ptr(&self.stream), d.dtype));
        let esize = dt.size_bytes() as u64;
        for start in (0..rows).step_by(chunk) {
            let c = chunk.min(rows - start);
            let h_chunk = h_ptr + (start * hidden_dim) as u64 * esize;
            self.gemm_raw(
                c,
                vocab,
                hidden_dim,
                1.0,
                Operand::dense(h_chunk, dt, hidden_dim),
                false,
                Operand::dense(w_ptr, dt, hidden_dim),
                true,
                0.0,
                Operand::dense(logits.ptr(&self.stream), DType::F32, vocab),
            )?;
            let args = [
                self.p(&logits),
                Arg::Ptr(t_ptr + start as u64 * 4),
                Arg::Ptr(if row_weights == 0 {
                    0
                } else {
                    row_weights + start as u64 * 4
                }),
                Arg::F32(scale),
                Arg::F32(gain),
                Arg::I32(want_grad as i32),
                Arg::Ptr(lp_ptr + start as u64 * 4),
                Arg::I32(vocab as i32),
            ];
            self.launch(
                &format!("softmax_cross_entropy_{}", suffix(dt)),
                (c as u32, 1, 1),
                512,
                0,
                &args,
            )?;
            if let Some((dh_ptr, dh_dt)) = dh {
                let dh_chunk = dh_ptr + (start * hidden_dim) as u64 * dh_dt.size_bytes() as u64;
                self.gemm_raw(
                    c,
                    hidden_dim,
                    vocab,
                    alpha,
                    Operand {
                        ptr: logits.ptr(&self.stream),
                        dtype: dt,
                        ld: dz_ld,
                    },
                    false,
                    Operand::dense(w_ptr, dt, hidden_dim),
                    false,
                    0.0,
                    Operand::dense(dh_chunk, dh_dt, hidden_dim),
                )?;
            }
        }
        Ok(())
    }
}
