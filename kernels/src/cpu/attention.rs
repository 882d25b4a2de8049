//! Causal self-attention with GQA, packed documents, padding and a sliding window, by the
//! definition: for query `i` and each visible key `j` (see `AttentionLayout`),
//! `s_j = (q_i · k_j)/sqrt(d)`, `p_j = exp(s_j − lse_i)`, `out_i = Σ_j p_j v_j`,
//! `lse_i = log Σ_j exp(s_j)`.
//! Backward (as in FlashAttention-2, Dao 2023): `dP_j = dout_i · v_j`, `D_i = dout_i · out_i`,
//! `dS_j = p_j (dP_j − D_i)`, `dq_i = Σ_j dS_j k_j / sqrt(d)`, `dk_j += dS_j q_i / sqrt(d)`,
//! `dv_j += p_j dout_i`.
//! Work is split by (row, kv head): each task owns its keys' dk/dv and its query heads' dq.

use crate::AttentionLayout;
use rayon::prelude::*;

/// One (row, kv head) task's slice of the batch.
struct Group {
    row: usize,
    kv_head: usize,
}

fn groups(layout: &AttentionLayout, kv_heads: usize) -> Vec<Group> {
    (0..layout.rows)
        .flat_map(|row| (0..kv_heads).map(move |kv_head| Group { row, kv_head }))
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &AttentionLayout,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let t = layout.seq_len;
    let per_kv = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // Each task returns (token, head, out row, lse) results; they are scattered afterwards.
    let results: Vec<Vec<(usize, usize, Vec<f32>, f32)>> = groups(layout, kv_heads)
        .par_iter()
        .map(|g| {
            let mut res = Vec::with_capacity(t * per_kv);
            let mut scores = vec![0.0f32; t];
            for qi in 0..t {
                let i = g.row * t + qi;
                let first = layout.first_key(i);
                for h in g.kv_head * per_kv..(g.kv_head + 1) * per_kv {
                    let qv = &q[(i * heads + h) * d..][..d];
                    let mut max = f32::NEG_INFINITY;
                    for kj in first..=qi {
                        let j = g.row * t + kj;
                        let s = dot(qv, &k[(j * kv_heads + g.kv_head) * d..][..d]) * scale;
                        scores[kj] = s;
                        max = max.max(s);
                    }
                    let mut sum = 0.0f32;
                    for s in &mut scores[first..=qi] {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let mut o = vec![0.0f32; d];
                    for kj in first..=qi {
                        let j = g.row * t + kj;
                        let p = scores[kj] / sum;
                        for (ov, vv) in o.iter_mut().zip(&v[(j * kv_heads + g.kv_head) * d..][..d])
                        {
                            *ov += p * vv;
                        }
                    }
                    res.push((i, h, o, max + sum.ln()));
                }
            }
            res
        })
        .collect();
    for (i, h, o, l) in results.into_iter().flatten() {
        out[(i * heads + h) * d..][..d].copy_from_slice(&o);
        lse[i * heads + h] = l;
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    layout: &AttentionLayout,
    heads: usize,
    kv_heads: usize,
    d: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let t = layout.seq_len;
    let per_kv = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    struct GroupGrads {
        dq: Vec<f32>, // [t, per_kv, d]
        dk: Vec<f32>, // [t, d]
        dv: Vec<f32>, // [t, d]
    }
    let tasks = groups(layout, kv_heads);
    let results: Vec<GroupGrads> = tasks
        .par_iter()
        .map(|g| {
            let mut gg = GroupGrads {
                dq: vec![0.0; t * per_kv * d],
                dk: vec![0.0; t * d],
                dv: vec![0.0; t * d],
            };
            let kv_offset = |kj: usize| ((g.row * t + kj) * kv_heads + g.kv_head) * d;
            for qi in 0..t {
                let i = g.row * t + qi;
                let first = layout.first_key(i);
                for (hl, h) in (g.kv_head * per_kv..(g.kv_head + 1) * per_kv).enumerate() {
                    let at = (i * heads + h) * d;
                    let (qv, ov, dov) = (&q[at..][..d], &out[at..][..d], &dout[at..][..d]);
                    let l = lse[i * heads + h];
                    let big_d = dot(dov, ov);
                    let dq_row = &mut gg.dq[(qi * per_kv + hl) * d..][..d];
                    for kj in first..=qi {
                        let (kv, vv) = (&k[kv_offset(kj)..][..d], &v[kv_offset(kj)..][..d]);
                        let p = (dot(qv, kv) * scale - l).exp();
                        let ds = p * (dot(dov, vv) - big_d);
                        for c in 0..d {
                            dq_row[c] += ds * kv[c] * scale;
                            gg.dk[kj * d + c] += ds * qv[c] * scale;
                            gg.dv[kj * d + c] += p * dov[c];
                        }
                    }
                }
            }
            gg
        })
        .collect();
    for (g, gg) in tasks.iter().zip(results) {
        for ti in 0..t {
            let i = g.row * t + ti;
            let kv_at = (i * kv_heads + g.kv_head) * d;
            dk[kv_at..][..d].copy_from_slice(&gg.dk[ti * d..][..d]);
            dv[kv_at..][..d].copy_from_slice(&gg.dv[ti * d..][..d]);
            for hl in 0..per_kv {
                let h = g.kv_head * per_kv + hl;
                dq[(i * heads + h) * d..][..d]
                    .copy_from_slice(&gg.dq[(ti * per_kv + hl) * d..][..d]);
            }
        }
    }
}

/// Generation attention against a KV cache (see `Backend::attention_cached`), by the definition.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_f32(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    first_key: &[i32],
    new: usize,
    filled: usize,
    capacity: usize,
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    let per_kv = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(t, o)| {
            let (row, j) = (t / new, t % new);
            let col = filled - new + j;
            let mut first = first_key[row].max(0) as usize;
            if let Some(w) = window {
                first = first.max((col + 1).saturating_sub(w));
            }
            for h in 0..heads {
                let kvh = h / per_kv;
                let qv = &q[(t * heads + h) * d..][..d];
                let key = |c: usize| ((row * capacity + c) * kv_heads + kvh) * d;
                let scores: Vec<f32> = (first..=col)
                    .map(|c| dot(qv, &k_cache[key(c)..][..d]) * scale)
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let oh = &mut o[h * d..][..d];
                oh.fill(0.0);
                for (c, e) in (first..=col).zip(&exps) {
                    for (x, v) in oh.iter_mut().zip(&v_cache[key(c)..][..d]) {
                        *x += e / sum * v;
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{check_gradient, dot as dot64, random};

    fn run(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        l: &AttentionLayout,
        h: usize,
        kvh: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = l.tokens();
        let mut out = vec![0.0; n * h * d];
        let mut lse = vec![0.0; n * h];
        attention_forward_f32(q, k, v, l, h, kvh, d, &mut out, &mut lse);
        (out, lse)
    }

    fn check_all_gradients(layout: &AttentionLayout, h: usize, kvh: usize, d: usize) {
        let n = layout.tokens();
        let q = random(n * h * d, 1);
        let k = random(n * kvh * d, 2);
        let v = random(n * kvh * d, 3);
        let probe = random(n * h * d, 4);
        let (out, lse) = run(&q, &k, &v, layout, h, kvh, d);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward_f32(
            &q, &k, &v, &out, &lse, &probe, layout, h, kvh, d, &mut dq, &mut dk, &mut dv,
        );
        check_gradient(&q, &dq, 1e-2, 2e-3, |q| {
            dot64(&run(q, &k, &v, layout, h, kvh, d).0, &probe)
        });
        check_gradient(&k, &dk, 1e-2, 2e-3, |k| {
            dot64(&run(&q, k, &v, layout, h, kvh, d).0, &probe)
        });
        check_gradient(&v, &dv, 1e-2, 2e-3, |v| {
            dot64(&run(&q, &k, v, layout, h, kvh, d).0, &probe)
        });
    }

    #[test]
    fn gqa_gradients_match_finite_differences() {
        check_all_gradients(&AttentionLayout::right_padded(&[6, 4], 6, None), 4, 2, 4);
    }

    #[test]
    fn packed_and_windowed_gradients_match_finite_differences() {
        check_all_gradients(
            &AttentionLayout::packed(&[vec![3, 4], vec![7]], 7, Some(3)),
            2,
            1,
            4,
        );
    }

    #[test]
    fn a_packed_row_equals_its_documents_run_alone() {
        let (h, d) = (2, 4);
        let packed = AttentionLayout::packed(&[vec![3, 4]], 7, None);
        let q = random(7 * h * d, 1);
        let k = random(7 * h * d, 2);
        let v = random(7 * h * d, 3);
        let (out, _) = run(&q, &k, &v, &packed, h, h, d);
        let alone = AttentionLayout::right_padded(&[4], 4, None);
        let tail = 3 * h * d;
        let (out2, _) = run(&q[tail..], &k[tail..], &v[tail..], &alone, h, h, d);
        for i in 0..out2.len() {
            assert!((out[tail + i] - out2[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn cached_attention_equals_full_attention_on_the_last_tokens() {
        let (h, kvh, d, t) = (4, 2, 4, 6);
        let layout = AttentionLayout::right_padded(&[t], t, Some(4));
        let q = random(t * h * d, 1);
        let k = random(t * kvh * d, 2);
        let v = random(t * kvh * d, 3);
        let (full, _) = run(&q, &k, &v, &layout, h, kvh, d);
        // The cache holds all 6 keys (capacity 8); the last 2 tokens are the queries.
        let cap = 8;
        let mut kc = vec![0.0; cap * kvh * d];
        let mut vc = vec![0.0; cap * kvh * d];
        kc[..t * kvh * d].copy_from_slice(&k);
        vc[..t * kvh * d].copy_from_slice(&v);
        let mut out = vec![0.0; 2 * h * d];
        attention_cached_f32(
            &q[4 * h * d..],
            &kc,
            &vc,
            &[0],
            2,
            t,
            cap,
            Some(4),
            h,
            kvh,
            d,
            &mut out,
        );
        for (a, b) in out.iter().zip(&full[4 * h * d..]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn the_first_token_copies_its_own_value() {
        let l = AttentionLayout::right_padded(&[2], 2, None);
        let q = random(4, 1);
        let k = random(4, 2);
        let v = random(4, 3);
        let (out, lse) = run(&q, &k, &v, &l, 1, 1, 2);
        assert_eq!(&out[..2], &v[..2]);
        assert!((lse[0] - dot(&q[..2], &k[..2]) / 2f32.sqrt()).abs() < 1e-6);
    }
}
