//! The CPU backend gives the same bits with 1, 2 and 4 threads: every op, forward and backward,
//! on shapes large enough to span several GEMM tiles and attention blocks.

use kernels::cpu::CpuBackend;
use kernels::{AdamWParams, AfterUpdate, AttentionLayout, Backend, CeGrad, QkvGrads};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Runs every op once and returns all outputs, in a fixed order.
fn every_op(be: &CpuBackend) -> Vec<Vec<f32>> {
    let mut outs = Vec::new();

    // GEMM: 300 × 600 × 70 spans 2 × 3 tiles; all four transpose combinations, beta 0 and 1.
    let (m, n, k) = (300, 600, 70);
    let (a, b) = (random(m * k, 1), random(k * n, 2));
    for (ta, tb, beta) in [
        (false, true, 0.0),
        (false, false, 1.0),
        (true, false, 1.0),
        (true, true, 0.0),
    ] {
        let mut c = random(m * n, 3);
        be.gemm(m, n, k, 0.5, &a, ta, &b, tb, beta, &mut c).unwrap();
        outs.push(c);
    }
    // A skinny C (halved tiles) and a deep product (split over k), as the LoRA and LM-head GEMMs.
    for (m, n, k) in [(1000, 16, 70), (20, 30, 5000)] {
        let (a, b) = (random(m * k, 15), random(k * n, 16));
        let mut c = random(m * n, 17);
        be.gemm(m, n, k, 0.5, &a, true, &b, false, 1.0, &mut c)
            .unwrap();
        outs.push(c);
    }

    // Attention with GQA and packed documents: 2 rows × 300 tokens span several blocks.
    let (t, heads, kv_heads, d) = (300, 4, 2, 16);
    let layout = AttentionLayout::packed(&[vec![120, 170], vec![300]], t, None);
    let n_tok = layout.tokens();
    let q = random(n_tok * heads * d, 4);
    let kk = random(n_tok * kv_heads * d, 5);
    let v = random(n_tok * kv_heads * d, 6);
    let dout = random(n_tok * heads * d, 7);
    let starts = be.upload_indices(&layout.doc_start).unwrap();
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; n_tok * heads];
    be.attention(
        &q, &kk, &v, &layout, &starts, heads, kv_heads, d, &mut out, &mut lse,
    )
    .unwrap();
    let QkvGrads { dq, dk, dv } = be
        .attention_backward(
            &q,
            &kk,
            &v,
            out.clone(),
            &lse,
            &dout,
            &layout,
            &starts,
            heads,
            kv_heads,
            d,
            None,
        )
        .unwrap();
    outs.extend([out, lse, dq, dk, dv]);

    // RMSNorm, RoPE, SwiGLU over 600 rows.
    let (rows, hidden) = (600, 96);
    let x = random(rows * hidden, 8);
    let w = random(hidden, 9);
    let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows]);
    be.rms_norm(&x, &w, hidden, 1e-5, &mut y, hidden, &mut rstd)
        .unwrap();
    let mut dx = random(x.len(), 10);
    be.rms_norm_backward(&y, &x, &w, &rstd, hidden, &mut dx)
        .unwrap();
    let positions: Vec<i32> = (0..rows as i32).map(|p| p % 300).collect();
    let cos = random(300 * 8, 11);
    let sin = random(300 * 8, 12);
    let mut roped = x.clone();
    be.rope(&mut roped, &positions, &cos, &sin, 6, 16, false)
        .unwrap();
    let mut act = vec![0.0; x.len()];
    be.swiglu(&x, &y, &mut act).unwrap();
    let (mut dg, mut du, mut act_again) = (x.clone(), y.clone(), dx.clone());
    be.swiglu_backward(&mut act_again, &mut dg, &mut du)
        .unwrap();
    outs.extend([y, rstd, dx, roped, act, dg, du, act_again]);

    // LM head + cross-entropy: 700 rows × vocab 9000 is several logit chunks and tiles.
    let (ce_rows, h, vocab) = (700, 40, 9000);
    let hid = random(ce_rows * h, 13);
    let emb = random(vocab * h, 14);
    let targets: Vec<i32> = (0..ce_rows as i32)
        .map(|r| {
            if r % 7 == 0 {
                -100
            } else {
                (r * 37) % vocab as i32
            }
        })
        .collect();
    let (mut logp, mut dh) = (vec![0.0; ce_rows], vec![0.0; ce_rows * h]);
    be.lm_head_cross_entropy(
        &hid,
        &emb,
        &targets,
        ce_rows,
        h,
        vocab,
        CeGrad::Scale(0.01),
        &mut logp,
        Some(&mut dh),
    )
    .unwrap();
    outs.extend([logp, dh]);

    // AdamW and the global norm.
    let mut params = vec![random(5000, 15)];
    let (mut m1, mut m2) = (vec![random(5000, 16)], vec![vec![0.01; 5000]]);
    let hp = AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    be.adamw(
        &mut params,
        &mut [random(5000, 17)],
        &mut m1,
        &mut m2,
        &hp,
        3,
        1.0,
        AfterUpdate::nothing(),
    )
    .unwrap();
    let norm = be.sum_of_squares(&params).unwrap();
    outs.extend(params);
    outs.push(vec![norm as f32]);
    outs
}

#[test]
fn one_two_and_four_threads_give_the_same_bits() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| every_op(&CpuBackend::new()))
    };
    let one = run(1);
    assert!(one.iter().flatten().all(|x| x.is_finite()));
    for threads in [2, 4] {
        let other = run(threads);
        assert_eq!(one.len(), other.len());
        for (i, (a, b)) in one.iter().zip(&other).enumerate() {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "output {i}: {differ} values differ with {threads} threads"
            );
        }
    }
}
