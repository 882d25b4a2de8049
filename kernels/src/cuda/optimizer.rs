//! The optimizer-side reductions and update over many tensors at once (kernels/cuda/adamw.cu and
//! reduce.cu): the tensors' addresses and first flat indices go to the device as small tables (one
//! copy a launch, [`upload_tables`]), so AdamW, the global gradient norm and the finiteness check
//! are one launch each.

use super::launch::{blocks_for, upload_tables, Arg};
use super::{CudaBackend, CudaTensor};
use crate::error::check_len;
use crate::{AdamWParams, AfterUpdate, DType, KernelError, Result};

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The device addresses of `tensors`.
fn addresses(be: &CudaBackend, tensors: &[CudaTensor]) -> Vec<u64> {
    tensors.iter().map(|t| t.ptr(&be.stream)).collect()
}

/// The first flat index of each tensor, then the total; and the total.
fn starts(tensors: &[CudaTensor]) -> (Vec<u64>, usize) {
    let mut starts = Vec::with_capacity(tensors.len() + 1);
    let mut total = 0u64;
    for t in tensors {
        starts.push(total);
        total += t.len() as u64;
    }
    starts.push(total);
    (starts, total as usize)
}

impl CudaBackend {
    pub(crate) fn sum_of_squares_impl(&self, tensors: &[CudaTensor]) -> Result<f64> {
        let total = self.reduce_tensors("sum_squares_multi", tensors, 0f64.to_bits(), 1024)?;
        Ok(f64::from_bits(total))
    }

    pub(crate) fn all_finite_impl(&self, tensors: &[CudaTensor]) -> Result<bool> {
        // The kernel's flag is the word's low 32 bits (an int on a little-endian device).
        Ok(self.reduce_tensors("all_finite_multi", tensors, 1, 2048)? as u32 == 1)
    }

    /// Runs a `*_multi` reduction kernel over every tensor at once (one launch, through the
    /// tables: addresses, dtype codes, first flat indices + total) into one device word that starts
    /// as `init` (uploaded with the tables, in the same copy), and reads it back.
    fn reduce_tensors(
        &self,
        kernel: &'static str,
        tensors: &[CudaTensor],
        init: u64,
        max_blocks: u32,
    ) -> Result<u64> {
        if tensors.iter().all(|t| t.is_empty()) {
            return Ok(init);
        }
        let codes: Vec<u64> = tensors.iter().map(|t| dtype_code(t.dtype) as u64).collect();
        let (starts, total) = starts(tensors);
        let tables = upload_tables(
            &self.stream,
            &[&addresses(self, tensors), &codes, &starts, &[init]],
        )?;
        let args = [
            tables.arg(0),
            tables.arg(1),
            tables.arg(2),
            Arg::I32(tensors.len() as i32),
            tables.arg(3),
        ];
        self.launch(
            kernel,
            (blocks_for(total).min(max_blocks), 1, 1),
            256,
            0,
            &args,
        )?;
        tables.read_word(&self.stream, 3)
    }

    /// `dst[at[i]..] ← src[i]` for every i: one `cast_multi_f32_<dst>` launch when every source
    /// is f32 (the LoRA masters), else one `cast_<src>_<dst>` each.
    pub(crate) fn copy_many_into_impl(
        &self,
        src: &[CudaTensor],
        dst: &mut CudaTensor,
        at: &[usize],
    ) -> Result<()> {
        crate::backend::check_copy_places(src.iter().map(|s| s.len()), at, dst.len())?;
        let base = dst.ptr(&self.stream);
        let size = dst.dtype.size_bytes() as u64;
        let places: Vec<u64> = at.iter().map(|&a| base + a as u64 * size).collect();
        if !src.iter().all(|s| s.dtype == DType::F32) {
            for (s, &place) in src.iter().zip(&places) {
                self.cast_to(s, place, dst.dtype)?;
            }
            return Ok(());
        }
        if src.iter().all(|t| t.is_empty()) {
            return Ok(());
        }
        let (starts, total) = starts(src);
        let tables = upload_tables(&self.stream, &[&addresses(self, src), &places, &starts])?;
        let name = format!("cast_multi_f32_{}", super::suffix(dst.dtype));
        let args = [
            tables.arg(0),
            tables.arg(1),
            tables.arg(2),
            Arg::I32(src.len() as i32),
        ];
        self.launch(&name, (blocks_for(total).min(4096), 1, 1), 256, 0, &args)
    }

    /// `t ← 0` for every tensor: one `zero_multi_f32` launch when all are f32 (the LoRA
    /// gradients), else one memset each.
    pub(crate) fn fill_zero_many_impl(&self, ts: &mut [CudaTensor]) -> Result<()> {
        if !ts.iter().all(|t| t.dtype == DType::F32) {
            for t in ts.iter_mut() {
                self.memset_zero(t)?;
            }
            return Ok(());
        }
        if ts.iter().all(|t| t.is_empty()) {
            return Ok(());
        }
        let (starts, total) = starts(ts);
        let tables = upload_tables(&self.stream, &[&addresses(self, ts), &starts])?;
        let args = [tables.arg(0), tables.arg(1), Arg::I32(ts.len() as i32)];
        self.launch(
            "zero_multi_f32",
            (blocks_for(total).min(4096), 1, 1),
            256,
            0,
            &args,
        )
    }

    /// [`crate::Backend::adamw`]: one `adamw_multi_f32` launch, which also writes the compute
    /// copies and zeroes the gradients where `after` asks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn adamw_impl(
        &self,
        params: &mut [CudaTensor],
        grads: &mut [CudaTensor],
        m: &mut [CudaTensor],
        v: &mut [CudaTensor],
        hp: &AdamWParams,
        step: u64,
        grad_scale: f32,
        after: AfterUpdate<'_, CudaTensor>,
    ) -> Result<()> {
        for (what, count) in [
            ("grads", grads.len()),
            ("exp_avg", m.len()),
            ("exp_avg_sq", v.len()),
        ] {
            check_len("adamw", what, count, params.len())?;
        }
        for i in 0..params.len() {
            check_len("adamw", "grad", grads[i].len(), params[i].len())?;
            check_len("adamw", "exp_avg", m[i].len(), params[i].len())?;
            check_len("adamw", "exp_avg_sq", v[i].len(), params[i].len())?;
            for t in [&params[i], &grads[i], &m[i], &v[i]] {
                if t.dtype != DType::F32 {
                    return Err(KernelError::Unsupported(format!(
                        "adamw: tensor {i} is {}; LoRA weights, gradients and moments must be f32",
                        t.dtype.name()
                    )));
                }
            }
        }
        // The compute copies' places (each weight's first element there) and their dtype's code.
        let (places, compute_code) = match after.compute {
            Some((dst, at)) => {
                crate::backend::check_copy_places(params.iter().map(|p| p.len()), at, dst.len())?;
                let (base, size) = (dst.ptr(&self.stream), dst.dtype.size_bytes() as u64);
                let places: Vec<u64> = at.iter().map(|&a| base + a as u64 * size).collect();
                (places, dtype_code(dst.dtype))
            }
            None => (Vec::new(), 0),
        };
        let total: usize = params.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let tables = upload_tables(
            &self.stream,
            &[
                &addresses(self, params),
                &addresses(self, grads),
                &addresses(self, m),
                &addresses(self, v),
                &starts(params).0,
                &places,
            ],
        )?;
        // Scalars formed in f64 and rounded once, exactly as the CPU reference does.
        let t = step as i32;
        let bias1 = 1.0 - hp.beta1.powi(t);
        let bias2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt() as f32;
        let step_size = (hp.lr / bias1) as f32;
        let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
        let mut args: Vec<Arg> = (0..5).map(|i| tables.arg(i)).collect();
        args.extend([
            Arg::I32(params.len() as i32),
            Arg::F32(step_size),
            Arg::F32(decay),
            Arg::F32((1.0 - hp.beta1) as f32),
            Arg::F32(hp.beta2 as f32),
            Arg::F32((1.0 - hp.beta2) as f32),
            Arg::F32(bias2_sqrt),
            Arg::F32(hp.eps as f32),
            Arg::F32(grad_scale),
            match places.is_empty() {
                true => Arg::Ptr(0),
                false => tables.arg(5),
            },
            Arg::I32(compute_code),
            Arg::I32(i32::from(after.zero_grads)),
        ]);
        // The tables are freed in stream order (cuMemFreeAsync), after the launch has read them.
        self.launch(
            "adamw_multi_f32",
            (blocks_for(total).min(4096), 1, 1),
            256,
            0,
            &args,
        )
    }
}
