//! Every op of the CUDA backend against the CPU reference on random inputs of realistic size,
//! in f32 (relative L2 error ≤ 1e-4), bf16 and f16 (within their rounding). Inputs are rounded to
//! the device dtype first and the CPU runs on those rounded values, so only the op's own error is
//! measured. Needs a GPU: without one each test prints why it skipped.
//! `cargo test -p kernels --features cuda --release --test cuda_matches_cpu -- --ignored` runs the
//! micro-benchmarks at Llama-2-7B shapes: attention and GEMMs, LoRA's backward products with dy
//! fused against as two GEMMs, and LoRA's terms beside the frozen products against folded into them.
#![cfg(feature = "cuda")]

use kernels::cpu::CpuBackend;
use kernels::cuda::{CudaBackend, CudaIndices, CudaTensor};
use kernels::nf4::{self, Absmax, AbsmaxBuffers, Nf4Buffers, Nf4Weight, DYNAMIC_MAP};
use kernels::{
    AdamWParams, AfterUpdate, AttentionLayout, Backend, CeGrad, DType, LoraPad, MatAt, Nf4Absmax,
    ParkLane, Placement, QkvGrads, Rotation, IGNORE_INDEX,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use std::time::Instant;

fn gpu(dtype: DType) -> Option<CudaBackend> {
    match CudaBackend::new(0, dtype) {
        Ok(b) => Some(b),
        // A kernel that does not compile is a failure, not a missing GPU.
        Err(e @ kernels::KernelError::Compile { .. }) => panic!("{e}"),
        Err(e) => {
            eprintln!("skipped: no usable CUDA device ({e})");
            None
        }
    }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

/// ‖got − want‖ / ‖want‖ in f64.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g}");
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
    }
}

fn check(what: &str, d: DType, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    println!("{what:<40} {:<4} rel err {e:.2e}", d.name());
    assert!(
        e <= tolerance(d),
        "{what} ({}): relative error {e:.3e} above {:.1e}",
        d.name(),
        tolerance(d)
    );
}

/// How many elements of `got` differ from `want` in their bits.
fn bits_differing(got: &[f32], want: &[f32]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count()
}

/// The first `cols` elements of every row of `v`, rows `ld` apart.
fn first_columns(v: &[f32], ld: usize, cols: usize) -> Vec<f32> {
    v.chunks(ld).flat_map(|row| &row[..cols]).copied().collect()
}

/// Uploads `data` in `d` and returns the tensor with the values it really holds.
fn up(g: &CudaBackend, data: &[f32], d: DType) -> (CudaTensor, Vec<f32>) {
    let t = g.upload(data, d).unwrap();
    let rounded = g.download(&t).unwrap();
    (t, rounded)
}

const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn norms_rope_swiglu_embedding_and_elementwise_match() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (n, hidden) = (2048, 4096);
        let (x, xr) = up(&g, &random(n * hidden, 1, 2.0), d);
        let (w, wr) = up(
            &g,
            &random(hidden, 2, 1.0)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect::<Vec<_>>(),
            d,
        );
        let mut y = g.zeros(n * hidden, d).unwrap();
        let mut rstd = g.zeros(n, DType::F32).unwrap();
        g.rms_norm(&x, &w, hidden, 1e-5, &mut y, hidden, &mut rstd)
            .unwrap();
        let (mut y_c, mut rstd_c) = (vec![0.0; n * hidden], vec![0.0; n]);
        cpu.rms_norm(&xr, &wr, hidden, 1e-5, &mut y_c, hidden, &mut rstd_c)
            .unwrap();
        check("rms_norm y", d, &g.download(&y).unwrap(), &y_c);
        check(
            "rms_norm rstd",
            DType::F32,
            &g.download(&rstd).unwrap(),
            &rstd_c,
        );
        let (dy, dyr) = up(&g, &random(n * hidden, 3, 1.0), d);
        let (mut dx, mut dx_c) = up(&g, &random(n * hidden, 4, 1.0), d);
        g.rms_norm_backward(&dy, &x, &w, &rstd, hidden, &mut dx)
            .unwrap();
        cpu.rms_norm_backward(&dyr, &xr, &wr, &rstd_c, hidden, &mut dx_c)
            .unwrap();
        check(
            "rms_norm_backward dx (adds into)",
            d,
            &g.download(&dx).unwrap(),
            &dx_c,
        );

        let (heads, hd) = (32, 128);
        let cfg = kernels::rope::RopeConfig {
            theta: 10000.0,
            head_dim: hd,
            scaling: kernels::rope::RopeScaling::Default,
        };
        let (cos, sin) = cfg.tables(4096, 4096);
        let positions: Vec<i32> = (0..n as i32).map(|i| (i * 7) % 4096).collect();
        let (mut q, mut q_c) = up(&g, &random(n * heads * hd, 5, 1.0), d);
        let pos = g.upload_indices(&positions).unwrap();
        let (cos_g, sin_g) = (
            g.upload(&cos, DType::F32).unwrap(),
            g.upload(&sin, DType::F32).unwrap(),
        );
        for inverse in [false, true] {
            g.rope(&mut q, &pos, &cos_g, &sin_g, heads, hd, inverse)
                .unwrap();
            cpu.rope(&mut q_c, &positions, &cos, &sin, heads, hd, inverse)
                .unwrap();
            check(
                if inverse { "rope inverse" } else { "rope" },
                d,
                &g.download(&q).unwrap(),
                &q_c,
            );
            q_c = g.download(&q).unwrap();
        }
        assert!(g
            .rope(
                &mut q,
                &g.upload_indices(&vec![5000; n]).unwrap(),
                &cos_g,
                &sin_g,
                heads,
                hd,
                false
            )
            .is_err());

        let inter = 11008;
        let m = 512 * inter;
        let (gate, gate_r) = up(&g, &random(m, 6, 4.0), d);
        let (upv, up_r) = up(&g, &random(m, 7, 1.0), d);
        let mut out = g.zeros(m, d).unwrap();
        g.swiglu(&gate, &upv, &mut out).unwrap();
        let mut out_c = vec![0.0; m];
        cpu.swiglu(&gate_r, &up_r, &mut out_c).unwrap();
        check("swiglu", d, &g.download(&out).unwrap(), &out_c);
        let (mut dout, mut dout_r) = up(&g, &random(m, 8, 1.0), d);
        let (mut dg, mut du) = (gate, upv);
        g.swiglu_backward(&mut dout, &mut dg, &mut du).unwrap();
        let (mut dg_c, mut du_c) = (gate_r, up_r);
        cpu.swiglu_backward(&mut dout_r, &mut dg_c, &mut du_c)
            .unwrap();
        check("swiglu_backward dgate", d, &g.download(&dg).unwrap(), &dg_c);
        check("swiglu_backward dup", d, &g.download(&du).unwrap(), &du_c);
        // dout becomes the forward's output again, bit for bit (the down projection's dA reads it).
        let (out, act) = (g.download(&out).unwrap(), g.download(&dout).unwrap());
        let differ = bits_differing(&act, &out);
        println!(
            "swiglu_backward output       {:<4} bits differing from the forward's {differ}",
            d.name()
        );
        assert_eq!(differ, 0, "swiglu_backward's output ({})", d.name());

        let (vocab, eh) = (32000, 512);
        let (table, table_r) = up(&g, &random(vocab * eh, 9, 1.0), d);
        let ids: Vec<i32> = (0..n as i32).map(|i| (i * 7919) % vocab as i32).collect();
        let mut emb = g.zeros(n * eh, d).unwrap();
        g.embedding(&table, &g.upload_indices(&ids).unwrap(), eh, &mut emb)
            .unwrap();
        let mut emb_c = vec![0.0; n * eh];
        cpu.embedding(&table_r, &ids, eh, &mut emb_c).unwrap();
        assert_eq!(
            g.download(&emb).unwrap(),
            emb_c,
            "embedding rows are exact copies"
        );
        assert!(g
            .embedding(
                &table,
                &g.upload_indices(&vec![vocab as i32; n]).unwrap(),
                eh,
                &mut emb
            )
            .is_err());

        // copy between dtypes, axpy, scale
        let src = random(100_000, 10, 3.0);
        let (s32, _) = up(&g, &src, DType::F32);
        let (mut dst, _) = up(&g, &vec![0.0; src.len()], d);
        g.copy(&s32, &mut dst).unwrap();
        let (_, src_in_d) = up(&g, &src, d);
        assert_eq!(
            g.download(&dst).unwrap(),
            src_in_d,
            "copy f32 -> {} rounds like the host",
            d.name()
        );
        let (mut acc, acc0) = up(&g, &random(src.len(), 11, 1.0), d);
        g.axpy(0.5, &dst, &mut acc).unwrap();
        g.scale(2.0, &mut acc).unwrap();
        let want: Vec<f32> = acc0
            .iter()
            .zip(&src_in_d)
            .map(|(a, s)| 2.0 * (a + 0.5 * s))
            .collect();
        check("axpy + scale", d, &g.download(&acc).unwrap(), &want);

        // a block of a stacked f32 result added into its own tensor (odd offset: no 16-byte rows)
        for offset in [48_000, 48_003] {
            let (mut block, block0) = up(&g, &random(1000, 12, 1.0), DType::F32);
            g.axpy_from(0.5, (&s32, offset), &mut block).unwrap();
            let want: Vec<f32> = block0
                .iter()
                .zip(&src[offset..])
                .map(|(b, s)| b + 0.5 * s)
                .collect();
            check("axpy_from", DType::F32, &g.download(&block).unwrap(), &want);
        }
        assert!(g.axpy_from(1.0, (&s32, src.len() - 10), &mut acc).is_err());
    }
}

/// The ops Qwen adds: the bias broadcast under a `beta = 1` GEMM (`y = b + x Wᵀ`), and RMSNorm
/// over each head of q (rows of head_dim: 128 as in Qwen3-8B, 24 as in tiny-qwen3), and over 301
/// rows of 100.
#[test]
fn bias_broadcast_and_per_head_rms_norm_match() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (n, in_f, out_f) = (1024, 512, 3584);
        let (b, br) = up(&g, &random(out_f, 11, 1.0), d);
        let (x, xr) = up(&g, &random(n * in_f, 12, 1.0), d);
        let (w, wr) = up(&g, &random(out_f * in_f, 13, 0.05), d);
        let mut y = g.zeros(n * out_f, d).unwrap();
        g.broadcast_rows(&b, &mut y).unwrap();
        g.gemm(n, out_f, in_f, 1.0, &x, false, &w, true, 1.0, &mut y)
            .unwrap();
        let mut y_c = vec![0.0; n * out_f];
        cpu.broadcast_rows(&br, &mut y_c).unwrap();
        cpu.gemm(n, out_f, in_f, 1.0, &xr, false, &wr, true, 1.0, &mut y_c)
            .unwrap();
        check("bias broadcast + gemm", d, &g.download(&y).unwrap(), &y_c);

        // Rows a warp each (rmsnorm.cu): 2048 tokens × 32 heads, and 301 rows of 100 (a last
        // block part empty, a row no multiple of 8) for the backward's tail too.
        for (rows, head_dim) in [(2048 * 32, 128), (2048 * 32, 24), (301, 100)] {
            let (q, qr) = up(&g, &random(rows * head_dim, 14, 2.0), d);
            let (w, wr) = up(
                &g,
                &random(head_dim, 15, 1.0)
                    .iter()
                    .map(|v| 1.0 + 0.5 * v)
                    .collect::<Vec<_>>(),
                d,
            );
            let mut y = g.zeros(rows * head_dim, d).unwrap();
            let mut rstd = g.zeros(rows, DType::F32).unwrap();
            g.rms_norm(&q, &w, head_dim, 1e-6, &mut y, head_dim, &mut rstd)
                .unwrap();
            let (mut y_c, mut rstd_c) = (vec![0.0; rows * head_dim], vec![0.0; rows]);
            cpu.rms_norm(&qr, &wr, head_dim, 1e-6, &mut y_c, head_dim, &mut rstd_c)
                .unwrap();
            check("per-head rms_norm y", d, &g.download(&y).unwrap(), &y_c);
            let (dy, dyr) = up(&g, &random(rows * head_dim, 16, 1.0), d);
            let mut dx = g.zeros(rows * head_dim, d).unwrap();
            let mut dx_c = vec![0.0; rows * head_dim];
            g.rms_norm_backward(&dy, &q, &w, &rstd, head_dim, &mut dx)
                .unwrap();
            cpu.rms_norm_backward(&dyr, &qr, &wr, &rstd_c, head_dim, &mut dx_c)
                .unwrap();
            check("per-head rms_norm dx", d, &g.download(&dx).unwrap(), &dx_c);
        }
    }
}

/// RMSNorm with `y`'s rows `ld > hidden` apart (LoRA's padded input `x' = [x | s·t]`): rows
/// 16-byte aligned (`ld = hidden + 48`) and not (`hidden + 3`), a row length that is no
/// multiple of 8, and rows a block each (4096 long) and a warp each (100 and 1024 long; 301 of
/// them, a last block part empty). The norm's columns and `rstd` are the dense launch's bits, the
/// pad columns keep theirs, and both match the CPU.
#[test]
fn strided_rms_norm_equals_the_dense_norm_and_leaves_the_pad() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        for (rows, hidden) in [(1024, 4096), (512, 100), (301, 1024)] {
            let (x, xr) = up(&g, &random(rows * hidden, 31, 2.0), d);
            let weights: Vec<f32> = random(hidden, 32, 1.0)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let (w, wr) = up(&g, &weights, d);
            let mut y = g.zeros(rows * hidden, d).unwrap();
            let mut rstd = g.zeros(rows, DType::F32).unwrap();
            g.rms_norm(&x, &w, hidden, 1e-5, &mut y, hidden, &mut rstd)
                .unwrap();
            let (y_dense, rstd_dense) = (g.download(&y).unwrap(), g.download(&rstd).unwrap());
            for ld in [hidden + 48, hidden + 3] {
                let what = format!("rows {rows} hidden {hidden} ld {ld} {}", d.name());
                let pad0 = random(rows * ld, 35, 4.0);
                let (mut y, pad) = up(&g, &pad0, d);
                let mut rstd = g.zeros(rows, DType::F32).unwrap();
                g.rms_norm(&x, &w, hidden, 1e-5, &mut y, ld, &mut rstd)
                    .unwrap();
                let got = g.download(&y).unwrap();
                assert_eq!(
                    bits_differing(&g.download(&rstd).unwrap(), &rstd_dense),
                    0,
                    "rstd, {what}"
                );
                let (mut y_c, mut rstd_c) = (pad.clone(), vec![0.0; rows]);
                cpu.rms_norm(&xr, &wr, hidden, 1e-5, &mut y_c, ld, &mut rstd_c)
                    .unwrap();
                check(
                    &format!("strided rms_norm y ld {ld}"),
                    d,
                    &first_columns(&got, ld, hidden),
                    &first_columns(&y_c, ld, hidden),
                );
                for r in 0..rows {
                    let row = &got[r * ld..][..ld];
                    assert_eq!(
                        bits_differing(&row[..hidden], &y_dense[r * hidden..][..hidden]),
                        0,
                        "y row {r}, {what}"
                    );
                    assert_eq!(
                        bits_differing(&row[hidden..], &pad[r * ld + hidden..][..ld - hidden]),
                        0,
                        "y pad of row {r}, {what}"
                    );
                }
            }
        }
    }
}

/// [`Backend::rms_norm_beside`] (the norm and the pad columns in one launch) against
/// [`Backend::rms_norm`] then [`Backend::place_block`] of the same `beside`: every bit of `y` and
/// `rstd`, rows aligned (`hidden + 48`) and not (`hidden + 3`, hidden 100).
#[test]
fn rms_norm_beside_equals_the_norm_then_the_pad_placed() {
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        for (rows, hidden, width) in [(1024, 4096, 48), (512, 100, 3), (300, 4096, 32)] {
            let ld = hidden + width;
            let what = format!("rows {rows} hidden {hidden} width {width} {}", d.name());
            let (x, _) = up(&g, &random(rows * hidden, 41, 2.0), d);
            let weights: Vec<f32> = random(hidden, 42, 1.0)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let (w, _) = up(&g, &weights, d);
            let (beside, _) = up(&g, &random(rows * width, 43, 3.0), d);
            let start = random(rows * ld, 44, 4.0);
            let (mut want, _) = up(&g, &start, d);
            let mut rstd_want = g.zeros(rows, DType::F32).unwrap();
            g.rms_norm(&x, &w, hidden, 1e-5, &mut want, ld, &mut rstd_want)
                .unwrap();
            g.place_block(
                rows,
                width,
                0..width,
                (&beside, MatAt::dense(width)),
                (&mut want, MatAt::at(hidden, ld)),
            )
            .unwrap();
            let (mut got, _) = up(&g, &start, d);
            let mut rstd = g.zeros(rows, DType::F32).unwrap();
            g.rms_norm_beside(&x, &w, hidden, 1e-5, (&mut got, ld), &beside, &mut rstd)
                .unwrap();
            let (got, want) = (g.download(&got).unwrap(), g.download(&want).unwrap());
            assert_eq!(bits_differing(&got, &want), 0, "y, {what}");
            let (rstd, rstd_want) = (g.download(&rstd).unwrap(), g.download(&rstd_want).unwrap());
            assert_eq!(bits_differing(&rstd, &rstd_want), 0, "rstd, {what}");
        }
    }
}

#[test]
fn gemm_matches_for_every_transpose_and_mixed_output() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (m, n, k) = (1024, 2048, 1536);
        let (a, ar) = up(&g, &random(m * k, 1, 1.0), d);
        let (b, br) = up(&g, &random(k * n, 2, 1.0), d);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for c_dtype in [d, DType::F32] {
                let (mut c, mut c_c) = up(&g, &random(m * n, 3, 1.0), c_dtype);
                g.gemm(m, n, k, 0.5, &a, ta, &b, tb, 1.0, &mut c).unwrap();
                cpu.gemm(m, n, k, 0.5, &ar, ta, &br, tb, 1.0, &mut c_c)
                    .unwrap();
                let tol_dtype = if c_dtype == DType::F32 && d == DType::F32 {
                    DType::F32
                } else {
                    d
                };
                check(
                    &format!("gemm ta={ta} tb={tb} C={}", c_dtype.name()),
                    tol_dtype,
                    &g.download(&c).unwrap(),
                    &c_c,
                );
            }
        }
    }
}

/// `gemm_residual` (`out = A Bᵀ + residual`, the o and down projections onto the residual
/// stream) matches the CPU's before tuning (cublasGemmEx after copying the residual into out) and
/// after (cuBLASLt reading the residual as C and writing out as D), the residual left unchanged; a
/// residual of another length is refused.
#[test]
fn gemm_residual_matches_before_and_after_tuning() {
    let cpu = CpuBackend::new();
    for d in [DType::BF16, DType::F16, DType::F32] {
        let Some(g) = gpu(d) else { return };
        let (m, n, k) = (1024, 4096, 16 + 4096);
        let (a, a_c) = up(&g, &random(m * k, 61, 1.0), d);
        let (b, b_c) = up(&g, &random(n * k, 62, 1.0), d);
        let (res, res_c) = up(&g, &random(m * n, 63, 4.0), d);
        for round in 0..2 {
            let mut out = g.zeros(m * n, d).unwrap();
            let mut out_c = vec![0.0; m * n];
            let (a_at, b_at) = (MatAt::dense(k), MatAt::dense(k));
            g.gemm_residual(
                m,
                n,
                k,
                1.0,
                (&a, a_at),
                false,
                (&b, b_at),
                true,
                &res,
                &mut out,
            )
            .unwrap();
            cpu.gemm_residual(
                m,
                n,
                k,
                1.0,
                (&a_c, a_at),
                false,
                (&b_c, b_at),
                true,
                &res_c,
                &mut out_c,
            )
            .unwrap();
            check(
                &format!("gemm_residual round {round}"),
                d,
                &g.download(&out).unwrap(),
                &out_c,
            );
            assert_eq!(
                bits_differing(&g.download(&res).unwrap(), &res_c),
                0,
                "residual untouched"
            );
            g.tune().unwrap();
        }
        let short = g.zeros(m * n - 1, d).unwrap();
        let mut out = g.zeros(m * n, d).unwrap();
        let err = g
            .gemm_residual(
                m,
                n,
                k,
                1.0,
                (&a, MatAt::dense(k)),
                false,
                (&b, MatAt::dense(k)),
                true,
                &short,
                &mut out,
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "gemm_residual: residual has {} elements, expected {}",
                m * n - 1,
                m * n
            )
        );
    }
}

/// Products on column blocks of wider matrices (LoRA's `t_q` of `t = x [A_q; A_k; A_v]ᵀ`, `u_k`
/// written into `u = [u_q, u_k, u_v]`) match the CPU's, before and after tuning picks algorithms
/// for them; C's other columns keep their values.
#[test]
fn gemm_on_column_blocks_matches_before_and_after_tuning() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (m, n, k, wide) = (4096, 16, 4096, 32);
        for round in 0..2 {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (a, a_c) = up(&g, &random(ar * (ac + wide), 1, 1.0), d);
                let (b, b_c) = up(&g, &random(br * (bc + wide), 2, 1.0), d);
                let c0 = random(m * (n + wide), 3, 1.0);
                let (mut c, mut c_c) = up(&g, &c0, DType::F32);
                let (a_at, b_at, c_at) = (
                    MatAt::at(16, ac + wide),
                    MatAt::at(8, bc + wide),
                    MatAt::at(16, n + wide),
                );
                g.gemm_at(
                    m,
                    n,
                    k,
                    0.5,
                    (&a, a_at),
                    ta,
                    (&b, b_at),
                    tb,
                    1.0,
                    (&mut c, c_at),
                )
                .unwrap();
                cpu.gemm_at(
                    m,
                    n,
                    k,
                    0.5,
                    (&a_c, a_at),
                    ta,
                    (&b_c, b_at),
                    tb,
                    1.0,
                    (&mut c_c, c_at),
                )
                .unwrap();
                let got = g.download(&c).unwrap();
                check(
                    &format!("gemm_at ta={ta} tb={tb} round {round}"),
                    d,
                    &got,
                    &c_c,
                );
                for r in 0..m {
                    for j in (0..16).chain(16 + n..n + wide) {
                        assert_eq!(got[r * (n + wide) + j], c0[r * (n + wide) + j]);
                    }
                }
            }
            g.tune().unwrap();
        }
        let err = g
            .gemm_at(
                8,
                8,
                8,
                1.0,
                (&g.zeros(64, d).unwrap(), MatAt::at(1, 8)),
                false,
                (&g.zeros(64, d).unwrap(), MatAt::dense(8)),
                false,
                0.0,
                (&mut g.zeros(64, DType::F32).unwrap(), MatAt::dense(8)),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}

fn attention_case(
    g: &CudaBackend,
    d: DType,
    layout: &AttentionLayout,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    label: &str,
) {
    let cpu = CpuBackend::new();
    let n = layout.tokens();
    let (q, qr) = up(g, &random(n * heads * hd, 1, 1.5), d);
    let (k, kr) = up(g, &random(n * kv_heads * hd, 2, 1.5), d);
    let (v, vr) = up(g, &random(n * kv_heads * hd, 3, 1.0), d);
    let (dout, dout_r) = up(g, &random(n * heads * hd, 4, 1.0), d);
    let doc = g.upload_indices(&layout.doc_start).unwrap();
    let mut out = g.upload(&vec![f32::NAN; n * heads * hd], d).unwrap();
    let mut lse = g.upload(&vec![f32::NAN; n * heads], DType::F32).unwrap();
    g.attention(
        &q, &k, &v, layout, &doc, heads, kv_heads, hd, &mut out, &mut lse,
    )
    .unwrap();
    let (mut out_c, mut lse_c) = (vec![0.0; n * heads * hd], vec![0.0; n * heads]);
    cpu.attention(
        &qr,
        &kr,
        &vr,
        layout,
        &layout.doc_start,
        heads,
        kv_heads,
        hd,
        &mut out_c,
        &mut lse_c,
    )
    .unwrap();
    let out_g = g.download(&out).unwrap();
    check(&format!("attention {label} out"), d, &out_g, &out_c);
    check(
        &format!("attention {label} lse"),
        DType::F32.max_tol(d),
        &g.download(&lse).unwrap(),
        &lse_c,
    );
    // The backward takes its gradients from the pool: NaN-filled buffers of their sizes go
    // back to it first, so that an element the kernels leave unwritten shows (one gradient
    // likely takes `out`'s buffer instead, dropped last: an element left unwritten there holds
    // `out`'s value, which the comparison with the CPU shows).
    let nan_grads = |g: &CudaBackend| {
        for len in [n * heads * hd, n * kv_heads * hd, n * kv_heads * hd] {
            drop(g.upload(&vec![f32::NAN; len], d).unwrap());
        }
    };
    nan_grads(g);
    let QkvGrads { dq, dk, dv } = g
        .attention_backward(
            &q, &k, &v, out, &lse, &dout, layout, &doc, heads, kv_heads, hd, None,
        )
        .unwrap();
    // The CPU backward runs on the GPU's rounded forward output, as the trainer would feed it.
    let QkvGrads {
        dq: mut dq_c,
        dk: dk_c,
        dv: dv_c,
    } = cpu
        .attention_backward(
            &qr,
            &kr,
            &vr,
            out_g.clone(),
            &lse_c,
            &dout_r,
            layout,
            &layout.doc_start,
            heads,
            kv_heads,
            hd,
            None,
        )
        .unwrap();
    check(
        &format!("attention {label} dq"),
        d,
        &g.download(&dq).unwrap(),
        &dq_c,
    );
    check(
        &format!("attention {label} dk"),
        d,
        &g.download(&dk).unwrap(),
        &dk_c,
    );
    check(
        &format!("attention {label} dv"),
        d,
        &g.download(&dv).unwrap(),
        &dv_c,
    );
    // dq rotated back by RoPE's inverse in the same call (the layer's backward): the CPU's dq
    // rotated by its rope op.
    let seq = layout.seq_len;
    let cos = random(seq * hd / 2, 5, 1.0);
    let sin = random(seq * hd / 2, 6, 1.0);
    let (cos_g, sin_g) = (
        g.upload(&cos, DType::F32).unwrap(),
        g.upload(&sin, DType::F32).unwrap(),
    );
    let positions = g.upload_indices(&layout.positions).unwrap();
    nan_grads(g);
    let out = g.upload(&out_g, d).unwrap();
    let dq_rot = g
        .attention_backward(
            &q,
            &k,
            &v,
            out,
            &lse,
            &dout,
            layout,
            &doc,
            heads,
            kv_heads,
            hd,
            Some(Rotation {
                positions: &positions,
                cos: &cos_g,
                sin: &sin_g,
            }),
        )
        .unwrap()
        .dq;
    cpu.rope(&mut dq_c, &layout.positions, &cos, &sin, heads, hd, true)
        .unwrap();
    check(
        &format!("attention {label} dq rotated back"),
        d,
        &g.download(&dq_rot).unwrap(),
        &dq_c,
    );
}

trait MaxTol {
    fn max_tol(self, other: DType) -> DType;
}
impl MaxTol for DType {
    /// The looser of two dtypes' tolerances (lse is f32 but computed from `other` inputs).
    fn max_tol(self, other: DType) -> DType {
        if tolerance(self) >= tolerance(other) {
            self
        } else {
            other
        }
    }
}

#[test]
fn attention_matches_with_gqa_window_packing_and_padding_at_seq_2048() {
    let seq = 2048;
    let packed = AttentionLayout::packed(&[vec![700, 900, 300], vec![2048]], seq, Some(512));
    let padded = AttentionLayout::right_padded(&[2048, 1500], seq, None);
    let left = AttentionLayout::left_padded(&[1000, 2048], seq, None);
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        attention_case(&g, d, &padded, 8, 2, 128, "gqa 8/2 d128 right-padded");
        attention_case(&g, d, &packed, 8, 2, 128, "gqa 8/2 d128 packed+window");
        attention_case(&g, d, &left, 4, 1, 64, "mqa 4/1 d64 left-padded");
        attention_case(&g, d, &packed, 4, 4, 128, "mha 4/4 d128 packed+window");
        attention_case(&g, d, &padded, 2, 2, 64, "mha 2/2 d64 right-padded");
        // 6 heads × 2 rows: a full group of heavy-first pairs and a partial one (attention.cuh);
        // seq 333: partial query and key tiles on the tensor-core paths
        let short = AttentionLayout::right_padded(&[333, 200], 333, None);
        attention_case(&g, d, &short, 6, 3, 128, "gqa 6/3 d128 seq 333");
        attention_case(&g, d, &short, 6, 2, 64, "gqa 6/2 d64 seq 333");
        attention_case(
            &g,
            d,
            &AttentionLayout::right_padded(&[300, 77], 333, Some(100)),
            4,
            2,
            96,
            "d96 window (simple path)",
        );
    }
}

#[test]
fn lm_head_cross_entropy_matches_with_ignored_rows_and_row_weights() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (rows, h, vocab) = (1500, 1024, 32000);
        let (hid, hid_r) = up(&g, &random(rows * h, 1, 1.0), d);
        let (w, wr) = up(&g, &random(vocab * h, 2, 0.1), d);
        let targets: Vec<i32> = (0..rows as i32)
            .map(|i| {
                if i % 5 == 0 {
                    IGNORE_INDEX
                } else {
                    (i * 31) % vocab as i32
                }
            })
            .collect();
        let tg = g.upload_indices(&targets).unwrap();
        let row_w = random(rows, 3, 1.0);
        let (row_w_g, _) = up(&g, &row_w, DType::F32);
        // fp16 trains under loss scaling: its token-mean gradient carries the scale, as the trainer's would.
        let mean_scale = if d == DType::F16 { 1024.0 } else { 1.0 } / rows as f32;
        for per_row in [false, true] {
            let mut lp = g.zeros(rows, DType::F32).unwrap();
            let mut dh = g.upload(&vec![f32::NAN; rows * h], d).unwrap();
            let grad = if per_row {
                CeGrad::PerRow(&row_w_g)
            } else {
                CeGrad::Scale(mean_scale)
            };
            g.lm_head_cross_entropy(&hid, &w, &tg, rows, h, vocab, grad, &mut lp, Some(&mut dh))
                .unwrap();
            let (mut lp_c, mut dh_c) = (vec![0.0; rows], vec![0.0; rows * h]);
            let grad_c = if per_row {
                CeGrad::PerRow(&row_w)
            } else {
                CeGrad::Scale(mean_scale)
            };
            cpu.lm_head_cross_entropy(
                &hid_r,
                &wr,
                &targets,
                rows,
                h,
                vocab,
                grad_c,
                &mut lp_c,
                Some(&mut dh_c),
            )
            .unwrap();
            let lp_g = g.download(&lp).unwrap();
            assert_eq!(lp_g[0], 0.0, "ignored row has logp 0");
            check(
                &format!("lm_head_ce logp per_row={per_row}"),
                DType::F32.max_tol(d),
                &lp_g,
                &lp_c,
            );
            check(
                &format!("lm_head_ce dhidden per_row={per_row}"),
                d,
                &g.download(&dh).unwrap(),
                &dh_c,
            );
        }
        let mut lp = g.zeros(rows, DType::F32).unwrap();
        assert!(g
            .lm_head_cross_entropy(
                &hid,
                &w,
                &g.upload_indices(&vec![vocab as i32; rows]).unwrap(),
                rows,
                h,
                vocab,
                CeGrad::None,
                &mut lp,
                None
            )
            .is_err());
    }
}

/// NF4 dequantization: in f32 the GPU must give the host reference's exact bits (every value is
/// one product, or the absmax decode's product then add); in bf16/f16 those bits rounded once.
#[test]
fn nf4_dequantize_is_bit_exact_in_f32_and_rounds_once_otherwise() {
    let cpu = CpuBackend::new();
    // 4096 × 4097 + 3: odd (a pad nibble), a partial last block, many nested groups, 3 elements
    // past the last whole chunk of 8; and 5: no whole chunk at all.
    for (n, double) in [(4096 * 4097 + 3, false), (4096 * 4097 + 3, true), (5, true)] {
        let x = random(n, 21, 0.05);
        let w = Nf4Weight::quantize(&x, double);
        let want = w.dequantize();
        for d in ALL {
            let Some(g) = gpu(d) else { return };
            let packed = g.upload_indices(&nf4::bytes_to_words(&w.packed)).unwrap();
            let mut out = g.zeros(n, d).unwrap();
            match &w.absmax {
                Absmax::Plain(a) => {
                    let a = g.upload(a, DType::F32).unwrap();
                    g.dequantize_nf4(&packed, Nf4Absmax::Plain(&a), n, n, None, &mut out)
                        .unwrap();
                }
                Absmax::Double(q) => {
                    let codes = g.upload_indices(&nf4::bytes_to_words(&q.codes)).unwrap();
                    let nested = g.upload(&q.nested_absmax, DType::F32).unwrap();
                    let map = g.upload(&DYNAMIC_MAP, DType::F32).unwrap();
                    let absmax = Nf4Absmax::Double {
                        codes: &codes,
                        nested_absmax: &nested,
                        map: &map,
                        offset: q.offset,
                    };
                    g.dequantize_nf4(&packed, absmax, n, n, None, &mut out)
                        .unwrap();
                }
            }
            let got = g.download(&out).unwrap();
            let rounded = g.download(&g.upload(&want, d).unwrap()).unwrap();
            let mismatches = bits_differing(&got, &rounded);
            println!(
                "nf4 dequantize n={n} double={double} {:<4} mismatches {mismatches}",
                d.name()
            );
            assert_eq!(mismatches, 0, "double={double} {}", d.name());
        }
    }
    let mut host = vec![0.0; 8];
    cpu.dequantize_nf4(
        &nf4::bytes_to_words(&nf4::pack(&[0, 15, 7, 8, 1, 2, 3, 4])),
        Nf4Absmax::Plain(&vec![2.0]),
        8,
        8,
        None,
        &mut host,
    )
    .unwrap();
    assert_eq!(&host[..3], &[-2.0, 2.0, 0.0]);
}

/// NF4 dequantization into rows `ld` apart, plain and double-quantized absmax, in every dtype: the
/// CPU's bits once rounded; without a pad the pad columns untouched, with a [`LoraPad`] holding B's
/// bits in its block and zeros in the rest, as the CPU writes them. Covers the 16-byte stores
/// (`cols` and `ld` multiples of 8), rows not 16-byte aligned (`ld = cols + 3`), chunks of 8
/// crossing rows with an odd element count and more pad elements than the grid has threads
/// (`cols = 41`), and a Llama-2-7B projection padded by three rank-16 adapters. B is read at an
/// offset, its rows farther apart than the block is wide. A B of another dtype is refused.
#[test]
fn strided_nf4_dequantize_is_bit_exact_and_writes_or_leaves_the_pad() {
    let cpu = CpuBackend::new();
    for (rows, cols, ld, block) in [
        (1000, 128, 176, 16..32),
        (1000, 128, 131, 1..2),
        (301, 41, 44, 0..3),
        (4096, 4096, 4144, 32..48),
    ] {
        let x = random(rows * cols, 23, 0.05);
        let pad0 = random(rows * ld, 24, 1.0);
        let b_at = MatAt::at(5, block.len() + 3);
        let b0 = random(b_at.extent(rows, block.len()), 25, 1.0);
        for double in [false, true] {
            let w = Nf4Weight::quantize(&x, double);
            let cpu_q = Nf4Buffers::upload(&cpu, &w).unwrap();
            for d in ALL {
                let Some(g) = gpu(d) else { return };
                let q = Nf4Buffers::upload(&g, &w).unwrap();
                let (b, b_c) = up(&g, &b0, d);
                for with_pad in [false, true] {
                    let what = format!(
                        "rows {rows} cols {cols} ld {ld} double {double} pad {with_pad} {}",
                        d.name()
                    );
                    let block = block.clone();
                    let pad = with_pad.then_some(LoraPad {
                        b: &b,
                        b_at,
                        block: block.clone(),
                    });
                    let cpu_pad = with_pad.then_some(LoraPad {
                        b: &b_c,
                        b_at,
                        block,
                    });
                    let (mut out, mut want) = up(&g, &pad0, d);
                    g.dequantize_nf4(&q.packed, q.absmax(), cols, ld, pad, &mut out)
                        .unwrap();
                    cpu.dequantize_nf4(&cpu_q.packed, cpu_q.absmax(), cols, ld, cpu_pad, &mut want)
                        .unwrap();
                    let want = g.download(&g.upload(&want, d).unwrap()).unwrap();
                    let mismatches = bits_differing(&g.download(&out).unwrap(), &want);
                    println!("strided nf4 dequantize {what} mismatches {mismatches}");
                    assert_eq!(mismatches, 0, "{what}");
                }
                let other = if d == DType::F32 {
                    DType::BF16
                } else {
                    DType::F32
                };
                let b_other = g.upload(&b0, other).unwrap();
                let pad = LoraPad {
                    b: &b_other,
                    b_at,
                    block: block.clone(),
                };
                let mut out = g.zeros(rows * ld, d).unwrap();
                let e = g
                    .dequantize_nf4(&q.packed, q.absmax(), cols, ld, Some(pad), &mut out)
                    .unwrap_err();
                assert!(e.to_string().contains("pad B is"), "{e}");
            }
        }
    }
}

/// The device's NF4 buffers as host bytes: packed codes, and the absmax (plain f32, or the 8-bit
/// codes, nested absmax and offset).
fn nf4_download(g: &CudaBackend, q: &Nf4Buffers<CudaTensor, CudaIndices>, n: usize) -> Nf4Weight {
    let blocks = nf4::n_blocks(n);
    let words = g.download_indices(&q.packed).unwrap();
    // The word padding past the last byte is zero, as bytes_to_words makes it.
    let packed = nf4::words_to_bytes(&words, words.len() * 4);
    assert!(
        packed[n.div_ceil(2)..].iter().all(|&b| b == 0),
        "packed padding"
    );
    let absmax = match &q.absmax {
        AbsmaxBuffers::Plain(a) => Absmax::Plain(g.download(a).unwrap()),
        AbsmaxBuffers::Double {
            codes,
            nested_absmax,
            map,
            offset,
        } => {
            let code_words = g.download_indices(codes).unwrap();
            let codes = nf4::words_to_bytes(&code_words, code_words.len() * 4);
            assert!(codes[blocks..].iter().all(|&b| b == 0), "code padding");
            assert_eq!(g.download(map).unwrap(), DYNAMIC_MAP.to_vec());
            Absmax::Double(nf4::DoubleQuantAbsmax {
                codes: codes[..blocks].to_vec(),
                nested_absmax: g.download(nested_absmax).unwrap(),
                offset: *offset,
            })
        }
    };
    Nf4Weight {
        n,
        packed: packed[..n.div_ceil(2)].to_vec(),
        absmax,
    }
}

/// Asserts the same bits in every packed byte, absmax, code, nested absmax and offset.
fn assert_nf4_bits(got: &Nf4Weight, want: &Nf4Weight, what: &str) {
    let differing = got
        .packed
        .iter()
        .zip(&want.packed)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "{what}: packed bytes differ");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match (&got.absmax, &want.absmax) {
        (Absmax::Plain(a), Absmax::Plain(b)) => assert_eq!(bits(a), bits(b), "{what}: absmax"),
        (Absmax::Double(a), Absmax::Double(b)) => {
            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{what}: offset");
            assert_eq!(a.codes, b.codes, "{what}: absmax codes");
            assert_eq!(
                bits(&a.nested_absmax),
                bits(&b.nested_absmax),
                "{what}: nested absmax"
            );
        }
        _ => panic!("{what}: absmax storage differs"),
    }
    assert_eq!(got, want, "{what}");
}

/// NF4 quantization on the GPU gives the host quantizer's bytes exactly, from every input dtype, on
/// ragged and whole sizes of a few million values with ties, zero blocks and outliers.
#[test]
fn nf4_quantize_matches_the_host_bytes_exactly() {
    for n in [4096 * 768, 2048 * 1500 + 35] {
        let mut x = random(n, 22, 0.05);
        // Block 1: the NF4 values and their midpoints, so every tie is taken (absmax 1).
        let mut ties = nf4::NF4_CODE.to_vec();
        ties.extend(nf4::nf4_midpoints());
        x[64..64 + ties.len()].copy_from_slice(&ties);
        x[64 + ties.len()..128].fill(0.0);
        // Block 2 all zero (absmax 0, scaled by 1/1e-38); an outlier in block 3.
        x[128..192].fill(0.0);
        x[200] = 7.5;
        for d in ALL {
            let Some(g) = gpu(d) else { return };
            let (t, held) = up(&g, &x, d);
            for double in [false, true] {
                let want = Nf4Weight::quantize(&held, double);
                let q = g.quantize_nf4(&t, double).unwrap();
                let got = nf4_download(&g, &q, n);
                assert_nf4_bits(&got, &want, &format!("n={n} {} double={double}", d.name()));
                println!(
                    "nf4 quantize n={n} {:<4} double={double}: identical",
                    d.name()
                );
            }
        }
    }
}

/// A fixture folder: beside the sources this test was built from, or, where the binary runs on
/// another machine (the GPU machine's copy of the checkout, at another path), under the working
/// directory's `tests/fixtures`.
fn fixture_dir(name: &str) -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let root = if built.is_dir() {
        built
    } else {
        std::path::PathBuf::from("tests/fixtures")
    };
    root.join(name)
}

/// The nf4-quant fixture (bitsandbytes 0.50.2): the GPU's codes, packed bytes and plain absmax are
/// bitsandbytes' own; double quantization is the host's (whose offset, an f64 mean, can sit one
/// ulp from bitsandbytes'), and bitsandbytes' own wherever the two offsets agree.
#[test]
fn nf4_quantize_matches_the_bitsandbytes_fixture() {
    let Some(g) = gpu(DType::F32) else { return };
    let dir = fixture_dir("nf4-quant");
    let read = |f: &str| {
        std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
    };
    let (inputs, expected) = (read("inputs.safetensors"), read("expected.safetensors"));
    let inp = SafeTensors::deserialize(&inputs).unwrap();
    let exp = SafeTensors::deserialize(&expected).unwrap();
    let bytes = |name: &str| exp.tensor(name).unwrap().data().to_vec();
    let f32s = |st: &SafeTensors, name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let mut offsets_agreeing = 0;
    for name in [
        "w_64x160",
        "w_160x64",
        "w_320x64",
        "w_129x131",
        "w_outliers_96x64",
        "w_f32_ties_64x64",
    ] {
        let x = f32s(&inp, name);
        let t = g.upload(&x, DType::F32).unwrap();
        let plain = nf4_download(&g, &g.quantize_nf4(&t, false).unwrap(), x.len());
        assert_eq!(
            plain.packed,
            bytes(&format!("{name}/plain/packed")),
            "{name}"
        );
        let Absmax::Plain(a) = &plain.absmax else {
            unreachable!()
        };
        let want = f32s(&exp, &format!("{name}/plain/absmax"));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{name} absmax"
        );
        let double = nf4_download(&g, &g.quantize_nf4(&t, true).unwrap(), x.len());
        assert_nf4_bits(&double, &Nf4Weight::quantize(&x, true), name);
        let Absmax::Double(d) = &double.absmax else {
            unreachable!()
        };
        if d.offset == f32s(&exp, &format!("{name}/double/offset"))[0] {
            offsets_agreeing += 1;
            assert_eq!(d.codes, bytes(&format!("{name}/double/absmax")), "{name}");
            let nested = f32s(&exp, &format!("{name}/double/nested_absmax"));
            assert_eq!(d.nested_absmax, nested, "{name} nested absmax");
        }
    }
    println!("nf4-quant fixture: 6/6 identical; double-quant codes checked against bitsandbytes for {offsets_agreeing}/6 offsets");
    assert!(
        offsets_agreeing >= 1,
        "w_64x160's offset is the f64 mean rounded"
    );
}

/// A checkpoint's 16-bit values copied as they are equal `upload` of their widened values, in the
/// same dtype and converted to another.
#[test]
fn sixteen_bit_uploads_equal_the_widened_upload() {
    for (stored, dtype) in [
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F32),
    ] {
        let Some(g) = gpu(dtype) else { return };
        let values = random(100_003, 9, 3.0);
        let rounded = g.download(&g.upload(&values, stored).unwrap()).unwrap();
        let bits: Vec<u16> = rounded
            .iter()
            .map(|&x| match stored {
                DType::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            })
            .collect();
        let got = g
            .download(&g.upload_16bit(&bits, stored, dtype).unwrap())
            .unwrap();
        let want = g.download(&g.upload(&rounded, dtype).unwrap()).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{stored:?} → {dtype:?}"
        );
    }
}

/// Checkpoint offload as the decoder uses it: a forward parks each layer's checkpoint (a group of
/// tensors of different sizes) while the next layer overwrites pool buffers of the same sizes (the
/// parked ones go back to the pool); the backward fetches them in reverse, each group prefetched a
/// layer ahead while that layer's work is queued. Every tensor must come back bit for bit, in its
/// place in the group, in bf16 and f32.
#[test]
fn offloaded_tensors_come_back_bit_for_bit_while_the_pool_reuses_their_buffers() {
    for dtype in [DType::BF16, DType::F32] {
        let Some(g) = gpu(dtype) else { return };
        let layers = 6;
        let sizes = [2048 * 4096 + 24, 2048 * 32, 2048 * 4096 + 24];
        let mut want = Vec::new();
        let mut parked = Vec::new();
        for l in 0..layers {
            let (group, rounded): (Vec<_>, Vec<_>) = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| up(&g, &random(n, 100 + 10 * l as u64 + i as u64, 1.0), dtype))
                .unzip();
            want.push(rounded);
            parked.push(g.park(group, ParkLane::Activations).unwrap());
            // The next layer's work: same-size buffers from the pool, written in full.
            for (i, &n) in sizes.iter().enumerate() {
                let mut scratch = g.empty(n, dtype).unwrap();
                g.fill_random(&mut scratch, 7 + l as u64 + i as u64, 3.0)
                    .unwrap();
                let mut other = g.empty(n, dtype).unwrap();
                g.copy(&scratch, &mut other).unwrap();
            }
        }
        for l in (0..layers).rev() {
            let this = parked.pop().unwrap();
            if let Some(below) = parked.last_mut() {
                g.prefetch(below).unwrap();
            }
            let group = g.unpark(this).unwrap();
            let mut scratch = g.empty(sizes[0], dtype).unwrap();
            g.fill_random(&mut scratch, 50 + l as u64, 3.0).unwrap();
            assert_eq!(group.len(), sizes.len());
            for (i, t) in group.iter().enumerate() {
                let got = g.download(t).unwrap();
                assert!(
                    got.iter()
                        .zip(&want[l][i])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?} layer {l}, tensor {i}: the offloaded tensor changed"
                );
            }
        }
    }
}

/// AdamW's state on the host as the optimizer streams it: each group parked, then fetched back
/// at once (the fetch, on its own stream, must wait for the park's copy to the host), updated
/// and parked again, the next group prefetched meanwhile; and the embedding gathered from a
/// parked table equals the device embedding, bit for bit.
#[test]
fn groups_fetched_right_after_parking_and_host_embedding_rows_are_exact() {
    let Some(g) = gpu(DType::BF16) else { return };
    let sizes = [16 * 4096, 4096 * 16, 16 * 11008];
    let mut want: Vec<Vec<Vec<f32>>> = (0..8)
        .map(|l| {
            (0..sizes.len())
                .map(|i| random(sizes[i], 300 + 10 * l + i as u64, 1.0))
                .collect()
        })
        .collect();
    let up_f32 = |v: &Vec<f32>| g.upload(v, DType::F32).unwrap();
    let mut parked: Vec<_> = want
        .iter()
        .map(|group| {
            g.park(group.iter().map(up_f32).collect(), ParkLane::OptimizerState)
                .unwrap()
        })
        .collect();
    for round in 0..3 {
        let mut next = Vec::new();
        let mut groups = parked.into_iter().peekable();
        let mut l = 0;
        while let Some(this) = groups.next() {
            if let Some(after) = groups.peek_mut() {
                g.prefetch(after).unwrap();
            }
            let mut group = g.unpark(this).unwrap();
            for (i, t) in group.iter_mut().enumerate() {
                assert_eq!(
                    g.download(t).unwrap(),
                    want[l][i],
                    "round {round}, group {l}, tensor {i}"
                );
                g.scale(2.0, t).unwrap();
                want[l][i].iter_mut().for_each(|x| *x *= 2.0);
            }
            next.push(g.park(group, ParkLane::OptimizerState).unwrap());
            l += 1;
        }
        parked = next;
    }
    let (vocab, hidden) = (1000, 4096);
    let (table, _) = up(&g, &random(vocab * hidden, 5, 1.0), DType::BF16);
    let ids = g
        .upload_indices(
            &(0..300)
                .map(|i| (i * 37 % vocab) as i32)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut on_device = g.empty(300 * hidden, DType::BF16).unwrap();
    g.embedding(&table, &ids, hidden, &mut on_device).unwrap();
    let host_table = g.park(vec![table], ParkLane::Activations).unwrap();
    let mut from_host = g.empty(300 * hidden, DType::BF16).unwrap();
    g.embedding_from_host(&host_table, &ids, hidden, &mut from_host)
        .unwrap();
    assert_eq!(
        g.download(&on_device).unwrap(),
        g.download(&from_host).unwrap()
    );
}

/// The compute copies of one layer's LoRA weights, written into one tensor at given offsets in one
/// launch, bit for bit as one copy each, in every destination dtype; the elements between the
/// places keep their values; 16-bit sources take the per-tensor path.
#[test]
fn copy_many_into_equals_one_copy_per_tensor() {
    let Some(g) = gpu(DType::BF16) else { return };
    let sizes = [4096 * 16, 16 * 11008, 3, 1 << 20, 7];
    let src: Vec<CudaTensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            g.upload(&random(n, 60 + i as u64, 1.0), DType::F32)
                .unwrap()
        })
        .collect();
    // Each tensor 5 elements after the previous one ends.
    let at: Vec<usize> = sizes
        .iter()
        .scan(5, |next, &n| {
            let start = *next;
            *next += n + 5;
            Some(start)
        })
        .collect();
    let total = at[sizes.len() - 1] + sizes[sizes.len() - 1] + 5;
    let filler = random(total, 66, 1.0);
    for to in [DType::BF16, DType::F16, DType::F32] {
        let mut dst = g.upload(&filler, to).unwrap();
        let before = g.download(&dst).unwrap();
        g.copy_many_into(&src, &mut dst, &at).unwrap();
        let got = g.download(&dst).unwrap();
        let mut want = before.clone();
        for (s, &start) in src.iter().zip(&at) {
            let mut one = g.zeros(s.len(), to).unwrap();
            g.copy(s, &mut one).unwrap();
            want[start..start + s.len()].copy_from_slice(&g.download(&one).unwrap());
        }
        assert!(
            got.iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "copy_many_into to {to:?} differs from one copy each"
        );
    }
    let halves: Vec<CudaTensor> = src[..2]
        .iter()
        .map(|s| {
            let mut h = g.zeros(s.len(), DType::BF16).unwrap();
            g.copy(s, &mut h).unwrap();
            h
        })
        .collect();
    let mut dst = g.zeros(total, DType::F32).unwrap();
    g.copy_many_into(&halves, &mut dst, &at[..2]).unwrap();
    let got = g.download(&dst).unwrap();
    let h1 = g.download(&halves[1]).unwrap();
    assert_eq!(&got[at[1]..at[1] + sizes[1]], &h1[..]);
}

/// A stacked f32 result's blocks added into their own tensors in one launch: each as
/// `axpy_from` alone leaves it, bit for bit (sizes not multiples of 8, a block at an odd offset);
/// a 16-bit destination takes the per-tensor path, and a block past the source is refused.
#[test]
fn axpy_from_many_equals_one_axpy_from_each() {
    let Some(g) = gpu(DType::F32) else { return };
    let sizes = [16 * 4096, 16 * 4096 + 3, 777];
    let offsets = [0, 16 * 4096, 2 * 16 * 4096 + 5];
    let src = g
        .upload(&random(offsets[2] + sizes[2], 80, 1.0), DType::F32)
        .unwrap();
    for d in [DType::F32, DType::BF16] {
        let starts: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random(n, 81 + i as u64, 1.0))
            .collect();
        let mut many: Vec<CudaTensor> = starts.iter().map(|v| g.upload(v, d).unwrap()).collect();
        let mut dsts: Vec<(usize, &mut CudaTensor)> =
            offsets.iter().copied().zip(many.iter_mut()).collect();
        g.axpy_from_many(0.5, &src, &mut dsts).unwrap();
        for (i, (v, &offset)) in starts.iter().zip(&offsets).enumerate() {
            let mut one = g.upload(v, d).unwrap();
            g.axpy_from(0.5, (&src, offset), &mut one).unwrap();
            let mismatches =
                bits_differing(&g.download(&many[i]).unwrap(), &g.download(&one).unwrap());
            assert_eq!(mismatches, 0, "block {i} into {}", d.name());
        }
    }
    let mut short = g.zeros(8, DType::F32).unwrap();
    let err = g
        .axpy_from_many(1.0, &src, &mut [(offsets[2] + sizes[2] - 4, &mut short)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("axpy_from_many"), "{err}");
}

/// `place_block`'s cases: (rows, width, block, src [len, at], dst [len, at]).
type PlaceCase = (
    usize,
    usize,
    std::ops::Range<usize>,
    (usize, MatAt),
    (usize, MatAt),
);

/// A LoRA B `[out, r]` into its block of a padded weight's pad columns, pad columns copied out to a
/// dense tensor and back, and a narrow block in rows not 16-byte aligned.
fn place_block_cases() -> Vec<PlaceCase> {
    let (out_f, in_f, r, width) = (4096, 4096, 16, 48);
    let ld = in_f + width;
    vec![
        // (rows, width, block, src [len, at], dst [len, at])
        (
            out_f,
            width,
            16..32,
            (out_f * r, MatAt::dense(r)),
            (out_f * ld, MatAt::at(in_f, ld)),
        ),
        (
            2048,
            width,
            0..width,
            (2048 * ld, MatAt::at(in_f, ld)),
            (2048 * width, MatAt::dense(width)),
        ),
        (
            2048,
            width,
            0..width,
            (2048 * width, MatAt::dense(width)),
            (2048 * ld, MatAt::at(in_f, ld)),
        ),
        (
            777,
            5,
            1..4,
            (777 * 7 + 2, MatAt::at(2, 7)),
            (777 * 13, MatAt::at(6, 13)),
        ),
    ]
}

/// `place_block` copies bit for bit as the CPU does: a LoRA B `[out, r]` into its block of a padded
/// weight's pad columns (the rest of the pad zeroed, the weight's own columns kept), pad columns
/// copied out to a dense tensor and back, and a narrow block in rows not 16-byte aligned. A
/// matrix past its tensor and mixed dtypes are refused.
#[test]
fn place_block_matches_bit_for_bit() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        for (i, (rows, width, block, (src_len, src_at), (dst_len, dst_at))) in
            place_block_cases().into_iter().enumerate()
        {
            let (src, src_c) = up(&g, &random(src_len, 40 + i as u64, 1.0), d);
            let (mut dst, mut dst_c) = up(&g, &random(dst_len, 50 + i as u64, 1.0), d);
            g.place_block(
                rows,
                width,
                block.clone(),
                (&src, src_at),
                (&mut dst, dst_at),
            )
            .unwrap();
            cpu.place_block(rows, width, block, (&src_c, src_at), (&mut dst_c, dst_at))
                .unwrap();
            let mismatches = bits_differing(&g.download(&dst).unwrap(), &dst_c);
            println!(
                "place_block case {i} {:<4} mismatches {mismatches}",
                d.name()
            );
            assert_eq!(mismatches, 0, "case {i} {}", d.name());
        }
        let src = g.zeros(8, d).unwrap();
        let mut dst = g.zeros(4 * 10, d).unwrap();
        let err = g
            .place_block(
                4,
                8,
                0..2,
                (&src, MatAt::dense(2)),
                (&mut dst, MatAt::at(3, 10)),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("dst [4×8] at element 3"), "{err}");
        let other = if d == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let err = g
            .place_block(
                4,
                8,
                0..2,
                (&g.zeros(8, other).unwrap(), MatAt::dense(2)),
                (&mut dst, MatAt::dense(10)),
            )
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("place_block: dst is"), "{err}");
    }
}

/// `place_blocks` (one launch) leaves every destination as `place_block` on each in turn does on
/// the CPU, bit for bit: `place_block`'s cases as one batch, each into a tensor of its own. A
/// batch mixing dtypes is refused.
#[test]
fn place_blocks_equal_one_place_block_each() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let cases = place_block_cases();
        let mut srcs = Vec::new();
        let mut dsts = Vec::new();
        for (i, (_, _, _, (src_len, _), (dst_len, _))) in cases.iter().enumerate() {
            srcs.push(up(&g, &random(*src_len, 60 + i as u64, 1.0), d));
            dsts.push(up(&g, &random(*dst_len, 70 + i as u64, 1.0), d));
        }
        let mut placements: Vec<Placement<'_, CudaTensor>> = cases
            .iter()
            .zip(&srcs)
            .zip(dsts.iter_mut())
            .map(|((c, (src, _)), (dst, _))| Placement {
                rows: c.0,
                width: c.1,
                block: c.2.clone(),
                src: (src, c.3 .1),
                dst: (dst, c.4 .1),
            })
            .collect();
        g.place_blocks(&mut placements).unwrap();
        drop(placements);
        for (i, (c, ((_, src_c), (dst, dst_c)))) in cases
            .into_iter()
            .zip(srcs.iter().zip(dsts.iter_mut()))
            .enumerate()
        {
            cpu.place_block(c.0, c.1, c.2, (src_c, c.3 .1), (dst_c, c.4 .1))
                .unwrap();
            let mismatches = bits_differing(&g.download(dst).unwrap(), dst_c);
            println!(
                "place_blocks case {i} {:<4} mismatches {mismatches}",
                d.name()
            );
            assert_eq!(mismatches, 0, "case {i} {}", d.name());
        }
        let other = if d == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let (src, mut a, mut b) = (
            g.zeros(8, d).unwrap(),
            g.zeros(40, d).unwrap(),
            g.zeros(40, other).unwrap(),
        );
        let place = |dst| Placement {
            rows: 4,
            width: 8,
            block: 0..2,
            src: (&src, MatAt::dense(2)),
            dst: (dst, MatAt::dense(10)),
        };
        let err = g
            .place_blocks(&mut [place(&mut a), place(&mut b)])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("place_blocks: "), "{err}");
    }
}

/// `lora_dy_products` against the CPU's two products, bf16 and f16 inputs: tails in n and out
/// (neither a whole number of the kernel's 64-row chunks and 128-column strips), ranks 8 to 64,
/// one member's columns of a 3-member `t` and `u` and B at an offset inside its tensor, both
/// results added onto non-zero f32 values (u's other columns keep theirs); then operands the fused
/// kernel does not take — out not a multiple of 8, r = 12, B not on 16 bytes — which run as the
/// two products. An f32 input where f32 accumulators belong is refused.
#[test]
fn lora_dy_products_match_with_tails_member_columns_and_fallbacks() {
    let cpu = CpuBackend::new();
    for d in [DType::BF16, DType::F16] {
        let Some(g) = gpu(d) else { return };
        // (n, out, r, member, B's offset in elements)
        let cases = [
            (1000, 1000, 8, 1, 64),
            (1000, 1000, 16, 2, 8),
            (1000, 1000, 32, 0, 0),
            (4096, 4096, 16, 1, 4096 * 16),
            (4096, 1024, 16, 0, 0),
            (300, 520, 64, 2, 0),
            (1000, 1001, 16, 1, 0),
            (1000, 1000, 12, 1, 0),
            (1000, 1000, 16, 1, 4),
        ];
        for (case, (n, out, r, member, b_offset)) in cases.into_iter().enumerate() {
            let (width, cols) = (3 * r, member * r..member * r + r);
            let at = MatAt::at(member * r, width);
            let b_at = MatAt::at(b_offset, r);
            let seed = 60 + 10 * case as u64;
            let (dy, dy_c) = up(&g, &random(n * out, seed, 1.0), d);
            let (t, t_c) = up(&g, &random(n * width, seed + 1, 1.0), d);
            let (b, b_c) = up(&g, &random(b_offset + out * r, seed + 2, 1.0), d);
            let (mut db, mut db_c) = up(&g, &random(out * r, seed + 3, 1.0), DType::F32);
            let u0 = random(n * width, seed + 4, 1.0);
            let (mut u, mut u_c) = up(&g, &u0, DType::F32);
            g.lora_dy_products(n, out, r, &dy, (&t, at), (&b, b_at), &mut db, (&mut u, at))
                .unwrap();
            cpu.lora_dy_products(
                n,
                out,
                r,
                &dy_c,
                (&t_c, at),
                (&b_c, b_at),
                &mut db_c,
                (&mut u_c, at),
            )
            .unwrap();
            let label = format!("lora_dy_products {n}x{out} r{r} member {member}");
            check(&format!("{label} dB"), d, &g.download(&db).unwrap(), &db_c);
            let got_u = g.download(&u).unwrap();
            let member_columns = |v: &[f32]| -> Vec<f32> {
                v.chunks(width)
                    .flat_map(|row| &row[cols.clone()])
                    .copied()
                    .collect()
            };
            check(
                &format!("{label} u"),
                d,
                &member_columns(&got_u),
                &member_columns(&u_c),
            );
            for (i, (row, row0)) in got_u.chunks(width).zip(u0.chunks(width)).enumerate() {
                for j in (0..width).filter(|j| !cols.contains(j)) {
                    assert_eq!(row[j], row0[j], "{label}: u [{i}, {j}], another member's");
                }
            }
        }
        let (n, out, r) = (64, 128, 16);
        let (dy, t, b) = (
            g.zeros(n * out, d).unwrap(),
            g.zeros(n * r, d).unwrap(),
            g.zeros(out * r, d).unwrap(),
        );
        let mut u = g.zeros(n * r, DType::F32).unwrap();
        let err = g
            .lora_dy_products(
                n,
                out,
                r,
                &dy,
                (&t, MatAt::dense(r)),
                (&b, MatAt::dense(r)),
                &mut g.zeros(out * r, d).unwrap(),
                (&mut u, MatAt::dense(r)),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("lora_dy_products: dB is {}, expected f32", d.name())
        );
    }
}

/// All gradients zeroed in one launch: every element of every tensor, whatever its size; a list
/// with a 16-bit tensor takes the per-tensor path.
#[test]
fn fill_zero_many_zeroes_every_tensor() {
    let Some(g) = gpu(DType::BF16) else { return };
    let sizes = [4096 * 16, 16 * 11008, 3, 1 << 20, 7];
    let mut ts: Vec<CudaTensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            g.upload(&random(n, 70 + i as u64, 1.0), DType::F32)
                .unwrap()
        })
        .collect();
    g.fill_zero_many(&mut ts).unwrap();
    for t in &ts {
        assert!(g.download(t).unwrap().iter().all(|&x| x.to_bits() == 0));
    }
    let mut mixed = vec![
        g.upload(&random(100, 80, 1.0), DType::BF16).unwrap(),
        g.upload(&random(100, 81, 1.0), DType::F32).unwrap(),
    ];
    g.fill_zero_many(&mut mixed).unwrap();
    for t in &mixed {
        assert!(g.download(t).unwrap().iter().all(|&x| x == 0.0));
    }
}

#[test]
fn optimizer_norm_and_finiteness_match_and_the_pool_reuses_zeroed_buffers() {
    let cpu = CpuBackend::new();
    let Some(g) = gpu(DType::BF16) else { return };
    let sizes = [4096 * 16, 16 * 11008, 3, 1 << 20];
    let hp = AdamWParams {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mk = |seed: u64, scale: f32| -> Vec<Vec<f32>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| random(s, seed + i as u64, scale))
            .collect()
    };
    let (mut p_c, g_c, mut m_c, mut v_c) = (mk(10, 1.0), mk(20, 0.01), mk(30, 0.001), mk(40, 0.0));
    v_c.iter_mut().flatten().for_each(|x| *x = x.abs() + 1e-6);
    let upl = |vs: &Vec<Vec<f32>>| -> Vec<CudaTensor> {
        vs.iter()
            .map(|v| g.upload(v, DType::F32).unwrap())
            .collect()
    };
    let (mut p, mut gr, mut m, mut v) = (upl(&p_c), upl(&g_c), upl(&m_c), upl(&v_c));
    // The fourth step also writes bf16 compute copies (with gaps between the tensors' places)
    // and zeroes the gradients, the fifth f32 ones (the f32 backend keeps its copies in f32):
    // the copies bit for bit copy_many_into's of the updated weights, the gradients zero, the
    // update itself as without them.
    let at: Vec<usize> = sizes
        .iter()
        .scan(8, |next, &s| Some(std::mem::replace(next, *next + s + 8)))
        .collect();
    let room = at.last().unwrap() + sizes.last().unwrap();
    let mut grads_c = g_c.clone();
    for step in 1..=5 {
        let copies = match step {
            4 => Some(DType::BF16),
            5 => Some(DType::F32),
            _ => None,
        };
        let zero_grads = step == 4;
        let mut compute = copies.map(|d| g.zeros(room, d).unwrap());
        let after = AfterUpdate {
            compute: compute.as_mut().map(|c| (c, &at[..])),
            zero_grads,
        };
        g.adamw(&mut p, &mut gr, &mut m, &mut v, &hp, step, 0.7, after)
            .unwrap();
        let after = AfterUpdate {
            compute: None,
            zero_grads,
        };
        cpu.adamw(
            &mut p_c,
            &mut grads_c,
            &mut m_c,
            &mut v_c,
            &hp,
            step,
            0.7,
            after,
        )
        .unwrap();
        if let (Some(d), Some(compute)) = (copies, &compute) {
            let mut cast = g.zeros(room, d).unwrap();
            g.copy_many_into(&p, &mut cast, &at).unwrap();
            assert_eq!(
                g.download(compute).unwrap(),
                g.download(&cast).unwrap(),
                "adamw's {} compute copies against copy_many_into's",
                d.name()
            );
        }
        if zero_grads {
            for (t, t_c) in gr.iter().zip(&grads_c) {
                assert!(g.download(t).unwrap().iter().all(|&x| x == 0.0));
                assert!(t_c.iter().all(|&x| x == 0.0));
            }
        }
    }
    for i in 0..sizes.len() {
        check(
            "adamw params",
            DType::F32,
            &g.download(&p[i]).unwrap(),
            &p_c[i],
        );
        check(
            "adamw exp_avg",
            DType::F32,
            &g.download(&m[i]).unwrap(),
            &m_c[i],
        );
        check(
            "adamw exp_avg_sq",
            DType::F32,
            &g.download(&v[i]).unwrap(),
            &v_c[i],
        );
    }
    let mut mixed = upl(&g_c);
    mixed.push(g.upload(&random(5000, 50, 1.0), DType::BF16).unwrap());
    let mut mixed_c = g_c.clone();
    mixed_c.push(g.download(&mixed[4]).unwrap());
    let (ss, ss_c) = (
        g.sum_of_squares(&mixed).unwrap(),
        cpu.sum_of_squares(&mixed_c).unwrap(),
    );
    println!("sum_of_squares gpu {ss:.6e} cpu {ss_c:.6e}");
    assert!(
        (ss - ss_c).abs() <= 1e-5 * ss_c,
        "sum of squares {ss} vs {ss_c}"
    );
    assert!(g.all_finite(&mixed).unwrap());
    let mut bad = g_c[1].clone();
    bad[777] = f32::INFINITY;
    mixed.push(g.upload(&bad, DType::F16).unwrap());
    assert!(!g.all_finite(&mixed).unwrap());
    assert!(!cpu.all_finite(&[bad]).unwrap());

    let len = 1 << 20;
    let before = g.peak_memory_bytes().unwrap();
    drop(g.upload(&vec![3.0; len], DType::F32).unwrap());
    let z = g.zeros(len, DType::F32).unwrap();
    assert!(
        g.download(&z).unwrap().iter().all(|&x| x == 0.0),
        "a reused buffer comes back zeroed"
    );
    assert_eq!(
        g.peak_memory_bytes().unwrap(),
        before.max(g.peak_memory_bytes().unwrap())
    );
    assert!(g.peak_memory_bytes().unwrap() >= (len * 4) as u64);
}

fn time_ms(g: &CudaBackend, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    g.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    g.synchronize().unwrap();
    start.elapsed().as_secs_f64() * 1e3 / iters as f64
}

#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_llama2_7b_attention_and_gemms() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    let (rows, seq, heads, hd, hidden, inter) = (2, 2048, 32, 128, 4096, 11008);
    let n = rows * seq;
    let layout = AttentionLayout::right_padded(&[seq, seq], seq, None);
    let doc = g.upload_indices(&layout.doc_start).unwrap();
    let q = g
        .upload(&random(n * heads * hd, 1, 1.0), DType::BF16)
        .unwrap();
    let k = g
        .upload(&random(n * heads * hd, 2, 1.0), DType::BF16)
        .unwrap();
    let v = g
        .upload(&random(n * heads * hd, 3, 1.0), DType::BF16)
        .unwrap();
    let dout = g
        .upload(&random(n * heads * hd, 4, 1.0), DType::BF16)
        .unwrap();
    let mut out = g.zeros(n * heads * hd, DType::BF16).unwrap();
    let mut lse = g.zeros(n * heads, DType::F32).unwrap();
    let causal_flops = 4.0 * rows as f64 * heads as f64 * (seq as f64).powi(2) / 2.0 * hd as f64;
    let fwd = time_ms(&g, 20, || {
        g.attention(
            &q, &k, &v, &layout, &doc, heads, heads, hd, &mut out, &mut lse,
        )
        .unwrap()
    });
    // The backward takes the forward's output: a copy for each of time_ms's 11 calls, made
    // before the clock starts.
    let out_host = g.download(&out).unwrap();
    let mut outs: Vec<_> = (0..11)
        .map(|_| g.upload(&out_host, DType::BF16).unwrap())
        .collect();
    let bwd = time_ms(&g, 10, || {
        let out = outs.pop().expect("one copy a call");
        g.attention_backward(
            &q, &k, &v, out, &lse, &dout, &layout, &doc, heads, heads, hd, None,
        )
        .unwrap();
    });
    println!(
        "attention fwd  b2 s2048 h32 d128: {fwd:.3} ms  {:.1} TFLOP/s",
        causal_flops / fwd / 1e9
    );
    println!(
        "attention bwd  b2 s2048 h32 d128: {bwd:.3} ms  {:.1} TFLOP/s",
        2.5 * causal_flops / bwd / 1e9
    );
    for (label, m, nn, kk) in [
        ("q/k/v/o proj  x[4096,4096]·Wᵀ", n, hidden, hidden),
        ("gate/up proj  x[4096,4096]·Wᵀ[11008]", n, inter, hidden),
        ("down proj     x[4096,11008]·Wᵀ", n, hidden, inter),
        ("lm head       x[4096,4096]·Wᵀ[32000]", n, 32000, hidden),
    ] {
        let a = g.upload(&random(m * kk, 5, 1.0), DType::BF16).unwrap();
        let b = g.upload(&random(nn * kk, 6, 1.0), DType::BF16).unwrap();
        let mut c = g.zeros(m * nn, DType::BF16).unwrap();
        let ms = time_ms(&g, 20, || {
            g.gemm(m, nn, kk, 1.0, &a, false, &b, true, 0.0, &mut c)
                .unwrap()
        });
        println!(
            "gemm {label}: {ms:.3} ms  {:.1} TFLOP/s",
            2.0 * (m * nn * kk) as f64 / ms / 1e9
        );
    }
    // LoRA's dA for q/k/v (rank 16): one product per member against one for the group, whose row
    // blocks are added into each member's gradient (model/linear.rs).
    let (r, x_in) = (
        16,
        g.upload(&random(n * hidden, 23, 1.0), DType::BF16).unwrap(),
    );
    let u = g.upload(&random(n * 3 * r, 24, 1.0), DType::BF16).unwrap();
    let mut grads: Vec<_> = (0..3)
        .map(|_| g.zeros(r * hidden, DType::F32).unwrap())
        .collect();
    let mut stacked = g.zeros(3 * r * hidden, DType::F32).unwrap();
    let (u_at, x_at) = (MatAt::dense(3 * r), MatAt::dense(hidden));
    let per_member = time_ms(&g, 20, || {
        for (m, da) in grads.iter_mut().enumerate() {
            let u_m = MatAt::at(m * r, 3 * r);
            g.gemm_at(
                r,
                hidden,
                n,
                1.0,
                (&u, u_m),
                true,
                (&x_in, x_at),
                false,
                1.0,
                (da, x_at),
            )
            .unwrap();
        }
    });
    let grouped = time_ms(&g, 20, || {
        g.gemm_at(
            3 * r,
            hidden,
            n,
            1.0,
            (&u, u_at),
            true,
            (&x_in, x_at),
            false,
            0.0,
            (&mut stacked, x_at),
        )
        .unwrap();
        for (m, da) in grads.iter_mut().enumerate() {
            g.axpy_from(1.0, (&stacked, m * r * hidden), da).unwrap();
        }
    });
    println!(
        "lora dA q/k/v 3x{r}x{hidden}x{n}: per member {:.1} µs, one product + 3 block adds {:.1} µs",
        per_member * 1e3,
        grouped * 1e3
    );
    let x = g.upload(&random(n * hidden, 7, 1.0), DType::BF16).unwrap();
    let w = g
        .upload(&random(32000 * hidden, 8, 0.02), DType::BF16)
        .unwrap();
    let targets = g
        .upload_indices(&(0..n as i32).map(|i| i % 32000).collect::<Vec<_>>())
        .unwrap();
    let mut lp = g.zeros(n, DType::F32).unwrap();
    let mut dh = g.zeros(n * hidden, DType::BF16).unwrap();
    let ms = time_ms(&g, 10, || {
        g.lm_head_cross_entropy(
            &x,
            &w,
            &targets,
            n,
            hidden,
            32000,
            CeGrad::Scale(1.0 / n as f32),
            &mut lp,
            Some(&mut dh),
        )
        .unwrap()
    });
    println!("lm_head + cross-entropy fwd+bwd 4096 rows, vocab 32000: {ms:.3} ms");
    println!(
        "peak pool memory: {:.2} GiB",
        g.peak_memory_bytes().unwrap() as f64 / (1u64 << 30) as f64
    );
}

/// LoRA's backward products with dy at Llama-2-7B's widths (n = 4096 = b2 × 2048, r = 16, the
/// q/k/v group's t and u of width 3r): the fused `lora_dy_products`, which reads dy once, against
/// the two cuBLAS products it replaces (`dB += dyᵀ t`, `u += dy B`, f32 outputs; cuBLAS's default,
/// then the tuned algorithms), with the rate of dy's reads (once by the fused op, twice by the pair).
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_lora_dy_products() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    let (n, r) = (4096, 16);
    let bf = |len: usize, seed: u64| g.upload(&random(len, seed, 0.1), DType::BF16).unwrap();
    let t = bf(n * 3 * r, 1);
    let at = MatAt::at(r, 3 * r);
    let mut u = g.zeros(n * 3 * r, DType::F32).unwrap();
    for out in [1024, 4096, 11008, 14336] {
        let (dy, b) = (bf(n * out, 2), bf(out * r, 3));
        let mut db = g.zeros(out * r, DType::F32).unwrap();
        let (dy_at, b_at) = (MatAt::dense(out), MatAt::dense(r));
        let fused = time_ms(&g, 50, || {
            g.lora_dy_products(n, out, r, &dy, (&t, at), (&b, b_at), &mut db, (&mut u, at))
                .unwrap()
        });
        let mut pair = || {
            time_ms(&g, 50, || {
                g.gemm_at(
                    out,
                    r,
                    n,
                    1.0,
                    (&dy, dy_at),
                    true,
                    (&t, at),
                    false,
                    1.0,
                    (&mut db, b_at),
                )
                .unwrap();
                g.gemm_at(
                    n,
                    r,
                    out,
                    1.0,
                    (&dy, dy_at),
                    false,
                    (&b, b_at),
                    false,
                    1.0,
                    (&mut u, at),
                )
                .unwrap();
            })
        };
        let pair_default = pair();
        g.tune().unwrap();
        let pair_tuned = pair();
        let dy_gb = (n * out * 2) as f64 / 1e9;
        println!(
            "lora dy products n {n} out {out:5} r {r}: fused {fused:.4} ms ({:.0} GB/s of dy); \
             dB + u by cuBLAS {pair_default:.4} ms ({:.0} GB/s), tuned {pair_tuned:.4} ms ({:.0} GB/s)",
            dy_gb / fused * 1e3,
            2.0 * dy_gb / pair_default * 1e3,
            2.0 * dy_gb / pair_tuned * 1e3
        );
    }
}

/// RMSNorm at 4096 × 4096 elements (bf16) cut into rows three ways: a 7B layer's 4096 tokens of
/// 4096 (the forward also into rows with room for q/k/v's folded `t`, 4144 long), the per-head
/// norm's 32 heads of 128 a token (Qwen3's q and k), and rows of 576 (SmolLM2-135M's hidden;
/// 29,127 of them). Forward and backward, against a device-to-device copy of x (the rate a kernel
/// that reads x once and writes y once can reach): microseconds a launch and the bytes moved per
/// second (the forward reads x and writes y; the backward reads dy, x and dx and writes dx).
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_rms_norm() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    let n = 4096 * 4096;
    let x = g.upload(&random(n, 61, 1.0), DType::BF16).unwrap();
    let mut copy = g.zeros(n, DType::BF16).unwrap();
    let rate =
        |ms: f64, bytes: usize| format!("{:.1} us ({:.2} TB/s)", ms * 1e3, bytes as f64 / ms / 1e9);
    let shapes = [
        ("rows of 4096", 4096),
        ("per head (rows of 128)", 128),
        ("rows of 576", 576),
    ];
    for round in 0..2 {
        let copy_ms = time_ms(&g, 100, || g.copy(&x, &mut copy).unwrap());
        println!("rms_norm round {round}: copy of x {}", rate(copy_ms, 4 * n));
        for (label, hidden) in shapes {
            let rows = n / hidden;
            let used = rows * hidden;
            let x = g.upload(&random(used, 61, 1.0), DType::BF16).unwrap();
            let dy = g.upload(&random(used, 64, 1.0), DType::BF16).unwrap();
            let mut dx = g.zeros(used, DType::BF16).unwrap();
            let w = g.upload(&random(hidden, 62, 1.0), DType::BF16).unwrap();
            let mut rstd = g.zeros(rows, DType::F32).unwrap();
            let mut line = format!("rms_norm round {round} {label}:");
            let lds: &[usize] = if hidden == 4096 {
                &[4096, 4144]
            } else {
                &[hidden]
            };
            for &y_ld in lds {
                let mut y = g.zeros(rows * y_ld, DType::BF16).unwrap();
                let ms = time_ms(&g, 100, || {
                    g.rms_norm(&x, &w, hidden, 1e-5, &mut y, y_ld, &mut rstd)
                        .unwrap()
                });
                line += &format!(" forward into rows {y_ld} long {};", rate(ms, 4 * used));
            }
            let ms = time_ms(&g, 100, || {
                g.rms_norm_backward(&dy, &x, &w, &rstd, hidden, &mut dx)
                    .unwrap()
            });
            println!("{line} backward {}", rate(ms, 8 * used));
        }
    }
}

/// The NF4 dequantization (double quant, bf16) at the 7B projections' shapes, dense and into
/// LoRA-padded rows with the pad written, against a device-to-device copy of the output's bytes
/// (the rate a bandwidth-bound kernel can reach): microseconds a launch, launches back to back
/// as in a step, and the bytes moved (n/2 codes + n/64 absmax codes read, 2n written) per second.
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_nf4_dequantize() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    for (label, rows, cols, width) in [
        ("q/o 4096 x 4096", 4096, 4096, 48),
        ("mistral k/v 1024 x 4096", 1024, 4096, 48),
        ("gate/up 11008 x 4096", 11008, 4096, 32),
        ("down 4096 x 11008", 4096, 11008, 0),
        ("mistral gate/up 14336 x 4096", 14336, 4096, 32),
        ("mistral down 4096 x 14336", 4096, 14336, 0),
    ] {
        let n = rows * cols;
        let x = g.upload(&random(n, 51, 0.05), DType::BF16).unwrap();
        let q = g.quantize_nf4(&x, true).unwrap();
        drop(x);
        let moved = (n / 2 + n / 64 + 2 * n) as f64;
        let mut dense = g.zeros(n, DType::BF16).unwrap();
        let dense_ms = time_ms(&g, 100, || {
            g.dequantize_nf4(&q.packed, q.absmax(), cols, cols, None, &mut dense)
                .unwrap()
        });
        let mut copy = g.zeros(n, DType::BF16).unwrap();
        let copy_ms = time_ms(&g, 100, || g.copy(&dense, &mut copy).unwrap());
        let mut line = format!(
            "nf4 dequantize {label}: dense {:.1} us ({:.2} TB/s); copy of the output {:.1} us ({:.2} TB/s)",
            dense_ms * 1e3,
            moved / dense_ms / 1e9,
            copy_ms * 1e3,
            (4 * n) as f64 / copy_ms / 1e9
        );
        if width > 0 {
            let ld = cols + width;
            let b = g.upload(&random(rows * 16, 52, 0.1), DType::BF16).unwrap();
            let mut padded = g.zeros(rows * ld, DType::BF16).unwrap();
            let padded_ms = time_ms(&g, 100, || {
                let pad = LoraPad {
                    b: &b,
                    b_at: MatAt::dense(16),
                    block: 0..16,
                };
                g.dequantize_nf4(&q.packed, q.absmax(), cols, ld, Some(pad), &mut padded)
                    .unwrap()
            });
            line += &format!(
                "; padded (ld {ld}) {:.1} us ({:.2} TB/s)",
                padded_ms * 1e3,
                (moved + (2 * rows * width) as f64) / padded_ms / 1e9
            );
        }
        println!("{line}");
    }
}

/// What LoRA's rank-16 terms cost beside the frozen products at Llama-2-7B shapes (b2 × 2048),
/// and what they would cost folded into them: the forward `y = s · t Bᵀ` then `y += x Wᵀ`
/// (model/linear.rs) against one product `[x | t] · [W | B]ᵀ` (K = in + r; in + 3r where q, k and
/// v share `[x | t_q t_k t_v]` and each `[W | B]` carries zero blocks), and the backward's
/// `u = dy B` then `dx += dy W` against one `[dx | u] (+)= dy · [W | B]` (N = in + r); cuBLAS's
/// default, then the tuned algorithms. With the write rate of a plain memset for the scale.
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_lora_folded_into_frozen_products() {
    let Some(g) = gpu(DType::BF16) else { return };
    let (n, r) = (4096, 16);
    let bf = |len: usize, seed: u64| g.upload(&random(len, seed, 0.1), DType::BF16).unwrap();
    for (label, out, inn) in [
        ("q/k/v/o", 4096, 4096),
        ("gate/up", 11008, 4096),
        ("down", 4096, 11008),
    ] {
        let (x, t) = (bf(n * inn, 1), bf(n * 3 * r, 2));
        let (w, b) = (bf(out * inn, 3), bf(out * r, 4));
        let (xa, wa) = (bf(n * (inn + 3 * r), 5), bf(out * (inn + 3 * r), 6));
        let dy = bf(n * out, 7);
        let mut y = g.zeros(n * out, DType::BF16).unwrap();
        let mut dx = g.zeros(n * (inn + r), DType::BF16).unwrap();
        let mut u = g.zeros(n * 3 * r, DType::BF16).unwrap();
        // `dx [n, in + r]`'s first `cols` columns += dy · [W | B]'s first `cols` columns.
        let dy_times_wa = |cols: usize, dx: &mut CudaTensor| {
            let (dy_at, wa_at) = (MatAt::dense(out), MatAt::dense(inn + 3 * r));
            g.gemm_at(
                n,
                cols,
                out,
                1.0,
                (&dy, dy_at),
                false,
                (&wa, wa_at),
                false,
                1.0,
                (dx, MatAt::dense(inn + r)),
            )
            .unwrap()
        };
        for tuned in [false, true] {
            let fwd = time_ms(&g, 20, || {
                let t_at = MatAt::at(0, 3 * r);
                g.gemm_at(
                    n,
                    out,
                    r,
                    1.0,
                    (&t, t_at),
                    false,
                    (&b, MatAt::dense(r)),
                    true,
                    0.0,
                    (&mut y, MatAt::dense(out)),
                )
                .unwrap();
                g.gemm(n, out, inn, 1.0, &x, false, &w, true, 1.0, &mut y)
                    .unwrap();
            });
            let folded = |k: usize| {
                let (a_at, b_at) = (MatAt::dense(inn + 3 * r), MatAt::dense(inn + 3 * r));
                let mut y2 = g.zeros(n * out, DType::BF16).unwrap();
                time_ms(&g, 20, || {
                    g.gemm_at(
                        n,
                        out,
                        k,
                        1.0,
                        (&xa, a_at),
                        false,
                        (&wa, b_at),
                        true,
                        0.0,
                        (&mut y2, MatAt::dense(out)),
                    )
                    .unwrap()
                })
            };
            let (fold1, fold3) = (folded(inn + r), folded(inn + 3 * r));
            let bwd = time_ms(&g, 20, || {
                let u_at = MatAt::at(0, 3 * r);
                g.gemm_at(
                    n,
                    r,
                    out,
                    1.0,
                    (&dy, MatAt::dense(out)),
                    false,
                    (&b, MatAt::dense(r)),
                    false,
                    0.0,
                    (&mut u, u_at),
                )
                .unwrap();
                dy_times_wa(inn, &mut dx);
            });
            let bwd_folded = time_ms(&g, 20, || dy_times_wa(inn + r, &mut dx));
            println!(
                "{label:8} {n}x{out}x{inn} {}: forward y = s t Bᵀ + x Wᵀ {:.1} µs, folded K+{r} {:.1} µs, K+{} {:.1} µs; \
                 backward u = dy B + dx += dy W {:.1} µs, folded N+{r} {:.1} µs",
                if tuned { "tuned  " } else { "default" },
                fwd * 1e3,
                fold1 * 1e3,
                3 * r,
                fold3 * 1e3,
                bwd * 1e3,
                bwd_folded * 1e3
            );
            g.tune().unwrap();
        }
        let ms = time_ms(&g, 20, || g.fill_zero(&mut y).unwrap());
        println!(
            "memset of y [{n}, {out}] bf16: {:.1} µs, {:.2} TB/s",
            ms * 1e3,
            (n * out * 2) as f64 / ms / 1e9
        );
    }
}

/// An input group's frozen products as one (issue #11: "q/k/v as one GEMM, gate/up as one"),
/// at Llama-2-7B's and Mistral-7B's widths, n = 4096, K the folded `[x | t]`'s: forward `y_i = x
/// W_iᵀ` per member against `[y_1 | y_2 …] = x [W_1; W_2 …]ᵀ`; backward `dx = Σ_i dy_i W_i` (beta 1
/// from the second member on) against `[dy_1 | dy_2 …] · [W_1; W_2 …]`, one product with K = Σ out.
/// Tuned, twice each, interleaved, 40 products a timing (long enough to meet the power cap).
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_group_products() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    let (n, hidden) = (4096, 4096);
    let bf = |len: usize, seed: u64| g.upload(&random(len, seed, 0.1), DType::BF16).unwrap();
    for (label, k, outs) in [
        ("llama2 gate/up", hidden + 32, vec![11008, 11008]),
        ("llama2 q/k/v", hidden + 48, vec![4096, 4096, 4096]),
        ("mistral q/k/v", hidden + 48, vec![4096, 1024, 1024]),
        ("mistral gate/up", hidden + 32, vec![14336, 14336]),
    ] {
        let total: usize = outs.iter().sum();
        let starts: Vec<usize> = outs
            .iter()
            .scan(0, |at, o| Some(std::mem::replace(at, *at + o)))
            .collect();
        let (x, w) = (bf(n * k, 1), bf(total * k, 2));
        let dy = bf(n * total, 3);
        let mut ys: Vec<_> = outs
            .iter()
            .map(|&o| g.zeros(n * o, DType::BF16).unwrap())
            .collect();
        let mut y = g.zeros(n * total, DType::BF16).unwrap();
        let (mut dx, mut dx2) = (
            g.zeros(n * hidden, DType::BF16).unwrap(),
            g.zeros(n * hidden, DType::BF16).unwrap(),
        );
        let (w_at, dy_at) = (
            |row: usize| MatAt::at(row * k, k),
            |col: usize| MatAt::at(col, total),
        );
        // `y [n, out] = x W[at..at + out]ᵀ`, and `dx (+)= dy[:, at..at + out] W[at..at + out]`.
        let forward = |y: &mut CudaTensor, out: usize, at: usize| {
            let (x_at, y_at) = (MatAt::dense(k), MatAt::dense(out));
            g.gemm_at(
                n,
                out,
                k,
                1.0,
                (&x, x_at),
                false,
                (&w, w_at(at)),
                true,
                0.0,
                (y, y_at),
            )
            .unwrap()
        };
        let backward = |dx: &mut CudaTensor, out: usize, at: usize, beta: f32| {
            let dx_at = MatAt::dense(hidden);
            g.gemm_at(
                n,
                hidden,
                out,
                1.0,
                (&dy, dy_at(at)),
                false,
                (&w, w_at(at)),
                false,
                beta,
                (dx, dx_at),
            )
            .unwrap()
        };
        let mut forward_apart = || {
            for ((yi, &o), &at) in ys.iter_mut().zip(&outs).zip(&starts) {
                forward(yi, o, at);
            }
        };
        let mut forward_joined = || forward(&mut y, total, 0);
        let mut backward_apart = || {
            for (i, (&o, &at)) in outs.iter().zip(&starts).enumerate() {
                backward(&mut dx, o, at, if i == 0 { 0.0 } else { 1.0 });
            }
        };
        let mut backward_joined = || backward(&mut dx2, total, 0, 0.0);
        forward_apart();
        forward_joined();
        backward_apart();
        backward_joined();
        g.tune().unwrap();
        let flops = 2.0 * (n * total * k) as f64;
        let bflops = 2.0 * (n * total * hidden) as f64;
        for round in 0..2 {
            let fa = time_ms(&g, 40, &mut forward_apart);
            let fj = time_ms(&g, 40, &mut forward_joined);
            let ba = time_ms(&g, 40, &mut backward_apart);
            let bj = time_ms(&g, 40, &mut backward_joined);
            println!(
                "{label:15} round {round}: forward {n}x{outs:?}x{k} apart {:.1} µs ({:.0} TFLOP/s), joined {:.1} µs ({:.0}); \
                 backward dx K={outs:?} apart {:.1} µs ({:.0}), joined {:.1} µs ({:.0})",
                fa * 1e3,
                flops / fa / 1e9,
                fj * 1e3,
                flops / fj / 1e9,
                ba * 1e3,
                bflops / ba / 1e9,
                bj * 1e3,
                bflops / bj / 1e9
            );
        }
    }
}

/// o's and down's LoRA folded (session 29, docs/benchmarks.md): in the step their products onto
/// the residual (`r + [x | t] · [W | B]ᵀ`, `gemm_residual`, K = in + 16) ran 7-8 % below the
/// plain products they replace. Here, tuned, at n = 4096: that product against the two it
/// replaces (the rank-16 product onto the residual, then the frozen product accumulating onto it,
/// K = in), the plain product alone with beta 1, and the folded product accumulating in place
/// (beta 1 onto the residual's own buffer, where `cublasGemmEx` is a candidate too). 40 products a
/// timing, two rounds.
#[test]
#[ignore = "micro-benchmark: run with --ignored on a GPU"]
fn bench_residual_products() {
    let Some(g) = gpu(DType::BF16) else { return };
    println!("device: {}", g.describe());
    let (n, out, r) = (4096, 4096, 16);
    let bf = |len: usize, seed: u64| g.upload(&random(len, seed, 0.1), DType::BF16).unwrap();
    for (label, input) in [
        ("o", 4096),
        ("down (llama2)", 11008),
        ("down (mistral)", 14336),
    ] {
        let k = input + r;
        // x' = [x | t] and W' = [W | B], rows k long; the unfolded products read their first
        // `input` columns (t and B their last r).
        let (x, w, res) = (bf(n * k, 1), bf(out * k, 2), bf(n * out, 3));
        let mut y = g.zeros(n * out, DType::BF16).unwrap();
        let product = |y: &mut CudaTensor, cols: std::ops::Range<usize>, residual: bool| {
            let (a, b) = (
                (&x, MatAt::at(cols.start, k)),
                (&w, MatAt::at(cols.start, k)),
            );
            let depth = cols.len();
            if residual {
                g.gemm_residual(n, out, depth, 1.0, a, false, b, true, &res, y)
            } else {
                let y_at = MatAt::dense(out);
                g.gemm_at(n, out, depth, 1.0, a, false, b, true, 1.0, (y, y_at))
            }
            .unwrap()
        };
        let folded = |y: &mut CudaTensor| product(y, 0..k, true);
        let unfolded = |y: &mut CudaTensor| {
            product(y, input..k, true);
            product(y, 0..input, false);
        };
        let plain = |y: &mut CudaTensor| product(y, 0..input, false);
        let in_place = |y: &mut CudaTensor| product(y, 0..k, false);
        folded(&mut y);
        unfolded(&mut y);
        in_place(&mut y);
        // Buffers of the operands' sizes cached in the pool, for the tuner's scratch operands.
        drop((bf(n * k, 4), bf(out * k, 5), bf(n * out, 6), bf(n * out, 7)));
        g.tune().unwrap();
        let flops = |depth: usize| 2.0 * (n * out * depth) as f64;
        for round in 0..2 {
            let f = time_ms(&g, 40, || folded(&mut y));
            let u = time_ms(&g, 40, || unfolded(&mut y));
            let p = time_ms(&g, 40, || plain(&mut y));
            let i = time_ms(&g, 40, || in_place(&mut y));
            println!(
                "{label:15} round {round}: folded {n}x{out}x{k} +residual {:.1} µs ({:.0} TFLOP/s); \
                 unfolded (x{r} +residual, then x{input} beta 1) {:.1} µs; plain x{input} beta 1 {:.1} µs ({:.0}); \
                 folded in place x{k} beta 1 {:.1} µs ({:.0})",
                f * 1e3,
                flops(k) / f / 1e9,
                u * 1e3,
                p * 1e3,
                flops(input) / p / 1e9,
                i * 1e3,
                flops(k) / i / 1e9
            );
        }
    }
}

#[test]
fn kv_cache_write_cached_attention_and_random_fill_match() {
    let cpu = CpuBackend::new();
    for d in ALL {
        let Some(g) = gpu(d) else { return };
        let (rows, cap, hq, hkv, hd, prompt, new) = (2, 40, 8, 2, 64, 30, 3);
        let width = hkv * hd;
        let mut caches = Vec::new();
        for (i, seed) in [11u64, 12].iter().enumerate() {
            let (mut gc, mut cc) = (
                g.zeros(rows * cap * width, d).unwrap(),
                vec![0.0; rows * cap * width],
            );
            for (at, n) in [(0, prompt), (prompt, new)] {
                let (src, src_h) = up(&g, &random(rows * n * width, seed + at as u64, 1.0), d);
                g.write_cache(&src, &mut gc, rows, n, cap, width, at)
                    .unwrap();
                cpu.write_cache(&src_h, &mut cc, rows, n, cap, width, at)
                    .unwrap();
            }
            let got = g.download(&gc).unwrap();
            assert_eq!(got, cc, "write_cache {i} ({})", d.name());
            caches.push((gc, cc));
        }
        let filled = prompt + new;
        let first_key = [0, 5];
        let (q, q_h) = up(&g, &random(rows * new * hq * hd, 13, 1.0), d);
        for window in [None, Some(8)] {
            let mut out = g.zeros(q_h.len(), d).unwrap();
            let mut want = vec![0.0; q_h.len()];
            g.attention_cached(
                &q,
                &caches[0].0,
                &caches[1].0,
                &g.upload_indices(&first_key).unwrap(),
                rows,
                new,
                filled,
                cap,
                window,
                hq,
                hkv,
                hd,
                &mut out,
            )
            .unwrap();
            cpu.attention_cached(
                &q_h,
                &caches[0].1,
                &caches[1].1,
                &first_key.to_vec(),
                rows,
                new,
                filled,
                cap,
                window,
                hq,
                hkv,
                hd,
                &mut want,
            )
            .unwrap();
            check(
                &format!("attention_cached window {window:?}"),
                d,
                &g.download(&out).unwrap(),
                &want,
            );
        }
        let mut r = g.zeros(100_003, d).unwrap();
        g.fill_random(&mut r, 99, 0.02).unwrap();
        let mut want = vec![0.0; 100_003];
        cpu.fill_random(&mut want, 99, 0.02).unwrap();
        let (_, want_rounded) = up(&g, &want, d);
        assert_eq!(
            g.download(&r).unwrap(),
            want_rounded,
            "fill_random ({})",
            d.name()
        );
    }
}
