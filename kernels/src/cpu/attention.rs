//! Causal self-attention with GQA, packed documents, padding and a sliding window, by the
//! definition: for query `i` and each visible key `j` (see `AttentionLayout`),
//! `s_j = (q_i · k_j)/sqrt(d)`, `p_j = exp(s_j − lse_i)`, `out_i = Σ_j p_j v_j`,
//! `lse_i = log Σ_j exp(s_j)`.
//! Backward (as in FlashAttention-2, Dao 2023): `dP_j = dout_i · v_j`, `D_i = dout_i · out_i`,
//! `dS_j = p_j (dP_j − D_i)`, `dq_i = Σ_j dS_j k_j / sqrt(d)`, `dk_j += dS_j q_i / sqrt(d)`,
//! `dv_j += p_j dout_i`.
//!
//! Both passes run in blocks of `BLOCK_Q` queries × `BLOCK_K` keys, so the scores of a long row
//! never exist at once and the products are GEMMs. The forward pass keeps the softmax online
//! (Milakov & Gimelshein 2018): per query a running max `m` and sum `l`; a new key block with
//! max `m'` rescales `l` and `out` by `exp(m − m')` before adding its own terms.
//! The forward pass splits the work by (row, head, query block); the backward pass by
//! (row, kv head), each task owning its keys' dk/dv and its query heads' dq. The blocks depend
//! on the shapes only, so the result is the same for any thread count.

use super::lanes;
use super::matmul::{gemm_view, MatMut, MatRef};
use crate::AttentionLayout;
use rayon::prelude::*;

/// Queries per block (rows of a score tile).
const BLOCK_Q: usize = 64;
/// Keys per block (columns of a score tile).
const BLOCK_K: usize = 128;

/// The shapes every block needs.
struct Dims {
    /// Tokens per row.
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
}

impl Dims {
    /// `rows` vectors of head `h` from token `(row, col)` on, in a `[tokens, heads, d]` tensor.
    fn q_rows<'a>(
        &self,
        x: &'a [f32],
        row: usize,
        col: usize,
        h: usize,
        rows: usize,
    ) -> MatRef<'a> {
        let at = ((row * self.t + col) * self.heads + h) * self.d;
        MatRef::new(&x[at..], rows, self.d, self.heads * self.d, 1)
    }

    /// The same in a `[tokens, kv_heads, d]` tensor.
    fn kv_rows<'a>(
        &self,
        x: &'a [f32],
        row: usize,
        col: usize,
        g: usize,
        rows: usize,
    ) -> MatRef<'a> {
        let at = ((row * self.t + col) * self.kv_heads + g) * self.d;
        MatRef::new(&x[at..], rows, self.d, self.kv_heads * self.d, 1)
    }
}

/// The query block `q0..q1` of `row`: each query's first visible key, and the first key any
/// of them sees (every query sees itself, so the block's keys are `k_lo..q1`).
fn first_keys(layout: &AttentionLayout, row: usize, q0: usize, q1: usize) -> (Vec<usize>, usize) {
    let t = layout.seq_len;
    let first: Vec<usize> = (q0..q1).map(|qi| layout.first_key(row * t + qi)).collect();
    let k_lo = first.iter().copied().min().unwrap_or(q0);
    (first, k_lo)
}

/// Columns of the key block `k0..k1` that query `qi` (first visible key `first`) sees,
/// as offsets into the block.
fn visible(first: usize, qi: usize, k0: usize, k1: usize) -> (usize, usize) {
    let lo = first.max(k0).min(k1);
    let hi = (qi + 1).min(k1).max(lo);
    (lo - k0, hi - k0)
}

/// One query block of one head: its output rows `[bq, d]` and log-sum-exps.
fn forward_block(
    dims: &Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    layout: &AttentionLayout,
    (row, h, q0): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let d = dims.d;
    let q1 = (q0 + BLOCK_Q).min(dims.t);
    let bq = q1 - q0;
    let g = h / (dims.heads / dims.kv_heads);
    let (first, k_lo) = first_keys(layout, row, q0, q1);
    let qv = dims.q_rows(q, row, q0, h, bq);
    let mut out = vec![0.0f32; bq * d];
    let mut max = vec![f32::NEG_INFINITY; bq];
    let mut sum = vec![0.0f32; bq];
    let mut s = vec![0.0f32; bq * BLOCK_K];
    for k0 in (k_lo..q1).step_by(BLOCK_K) {
        let k1 = (k0 + BLOCK_K).min(q1);
        let bk = k1 - k0;
        let s = &mut s[..bq * bk];
        // S = Q Kᵀ / sqrt(d)   [bq, bk]
        let kv = dims.kv_rows(k, row, k0, g, bk);
        gemm_view(dims.scale, qv, kv.t(), 0.0, MatMut::row_major(s, bq, bk));
        lanes::wide(
            #[inline(always)]
            || {
                for r in 0..bq {
                    let srow = &mut s[r * bk..][..bk];
                    let (lo, hi) = visible(first[r], q0 + r, k0, k1);
                    srow[..lo].fill(0.0);
                    srow[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let new_max = max[r].max(lanes::max(&srow[lo..hi]));
                    let correction = lanes::exp(max[r] - new_max);
                    sum[r] = sum[r] * correction
                        + lanes::exp_shifted_in_place(&mut srow[lo..hi], new_max);
                    out[r * d..][..d].iter_mut().for_each(|o| *o *= correction);
                    max[r] = new_max;
                }
            },
        );
        // out += P V   [bq, d]
        let p = MatRef::row_major(s, bq, bk);
        let vv = dims.kv_rows(v, row, k0, g, bk);
        gemm_view(1.0, p, vv, 1.0, MatMut::row_major(&mut out, bq, d));
    }
    let lse = (0..bq).map(|r| max[r] + sum[r].ln()).collect();
    for (o, l) in out.chunks_exact_mut(d).zip(&sum) {
        o.iter_mut().for_each(|x| *x /= l);
    }
    (out, lse)
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
    let dims = Dims {
        t,
        heads,
        kv_heads,
        d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let tasks: Vec<(usize, usize, usize)> = (0..layout.rows)
        .flat_map(|row| (0..heads).map(move |h| (row, h)))
        .flat_map(|(row, h)| (0..t).step_by(BLOCK_Q).map(move |q0| (row, h, q0)))
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&task| forward_block(&dims, (q, k, v), layout, task))
        .collect();
    for (&(row, h, q0), (o, l)) in tasks.iter().zip(results) {
        for (r, (o_row, &l_row)) in o.chunks_exact(d).zip(&l).enumerate() {
            let i = row * t + q0 + r;
            out[(i * heads + h) * d..][..d].copy_from_slice(o_row);
            lse[i * heads + h] = l_row;
        }
    }
}

/// Gradients of one (row, kv head): dq of its query heads `[t, per_kv, d]`, its dk and dv `[t, d]`.
struct GroupGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The forward tensors the backward pass reads.
struct Saved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

fn backward_group(
    dims: &Dims,
    x: &Saved,
    layout: &AttentionLayout,
    (row, g): (usize, usize),
) -> GroupGrads {
    let (t, d) = (dims.t, dims.d);
    let per_kv = dims.heads / dims.kv_heads;
    let mut gg = GroupGrads {
        dq: vec![0.0; t * per_kv * d],
        dk: vec![0.0; t * d],
        dv: vec![0.0; t * d],
    };
    let mut p = vec![0.0f32; BLOCK_Q * BLOCK_K];
    let mut ds = vec![0.0f32; BLOCK_Q * BLOCK_K];
    for (hl, h) in (g * per_kv..(g + 1) * per_kv).enumerate() {
        for q0 in (0..t).step_by(BLOCK_Q) {
            let q1 = (q0 + BLOCK_Q).min(t);
            let bq = q1 - q0;
            let (first, k_lo) = first_keys(layout, row, q0, q1);
            let qv = dims.q_rows(x.q, row, q0, h, bq);
            let dov = dims.q_rows(x.dout, row, q0, h, bq);
            let at = |r: usize| (row * t + q0 + r) * dims.heads + h;
            // D_i = dout_i · out_i
            let big_d: Vec<f32> = (0..bq)
                .map(|r| lanes::dot(&x.dout[at(r) * d..][..d], &x.out[at(r) * d..][..d]))
                .collect();
            for k0 in (k_lo..q1).step_by(BLOCK_K) {
                let k1 = (k0 + BLOCK_K).min(q1);
                let bk = k1 - k0;
                let (p, ds) = (&mut p[..bq * bk], &mut ds[..bq * bk]);
                let kv = dims.kv_rows(x.k, row, k0, g, bk);
                let vv = dims.kv_rows(x.v, row, k0, g, bk);
                // S = Q Kᵀ / sqrt(d) into p, dP = dO Vᵀ into ds   [bq, bk]
                gemm_view(dims.scale, qv, kv.t(), 0.0, MatMut::row_major(p, bq, bk));
                gemm_view(1.0, dov, vv.t(), 0.0, MatMut::row_major(ds, bq, bk));
                lanes::wide(
                    #[inline(always)]
                    || {
                        for r in 0..bq {
                            let (lo, hi) = visible(first[r], q0 + r, k0, k1);
                            let (prow, dsrow) = (&mut p[r * bk..][..bk], &mut ds[r * bk..][..bk]);
                            let (l, dr) = (x.lse[at(r)], big_d[r]);
                            for (pj, dsj) in prow[lo..hi].iter_mut().zip(&mut dsrow[lo..hi]) {
                                *pj = lanes::exp(*pj - l);
                                // dS/sqrt(d): the scale of dq and dk, folded in once
                                *dsj = *pj * (*dsj - dr) * dims.scale;
                            }
                            prow[..lo].fill(0.0);
                            prow[hi..].fill(0.0);
                            dsrow[..lo].fill(0.0);
                            dsrow[hi..].fill(0.0);
                        }
                    },
                );
                let (pm, dsm) = (MatRef::row_major(p, bq, bk), MatRef::row_major(ds, bq, bk));
                // dV += Pᵀ dO,  dK += dSᵀ Q,  dQ += dS K
                let dv = MatMut::row_major(&mut gg.dv[k0 * d..k1 * d], bk, d);
                gemm_view(1.0, pm.t(), dov, 1.0, dv);
                let dk = MatMut::row_major(&mut gg.dk[k0 * d..k1 * d], bk, d);
                gemm_view(1.0, dsm.t(), qv, 1.0, dk);
                let dq = MatMut::new(&mut gg.dq[(q0 * per_kv + hl) * d..], bq, d, per_kv * d, 1);
                gemm_view(1.0, dsm, kv, 1.0, dq);
            }
        }
    }
    gg
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
    let dims = Dims {
        t,
        heads,
        kv_heads,
        d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let saved = Saved {
        q,
        k,
        v,
        out,
        lse,
        dout,
    };
    let tasks: Vec<(usize, usize)> = (0..layout.rows)
        .flat_map(|row| (0..kv_heads).map(move |g| (row, g)))
        .collect();
    let results: Vec<GroupGrads> = tasks
        .par_iter()
        .map(|&task| backward_group(&dims, &saved, layout, task))
        .collect();
    for (&(row, g), gg) in tasks.iter().zip(results) {
        for ti in 0..t {
            let i = row * t + ti;
            let kv_at = (i * kv_heads + g) * d;
            dk[kv_at..][..d].copy_from_slice(&gg.dk[ti * d..][..d]);
            dv[kv_at..][..d].copy_from_slice(&gg.dv[ti * d..][..d]);
            let q_at = (i * heads + g * per_kv) * d;
            dq[q_at..][..per_kv * d].copy_from_slice(&gg.dq[ti * per_kv * d..][..per_kv * d]);
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
                let mut exps: Vec<f32> = (first..=col)
                    .map(|c| lanes::dot(qv, &k_cache[key(c)..][..d]) * scale)
                    .collect();
                let max = lanes::max(&exps);
                let sum = lanes::exp_shifted_in_place(&mut exps, max);
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

    /// out, lse, dq, dk, dv by the definition in f64, one query at a time.
    #[allow(clippy::type_complexity)]
    fn by_definition(
        (q, k, v, dout): (&[f32], &[f32], &[f32], &[f32]),
        l: &AttentionLayout,
        h: usize,
        kvh: usize,
        d: usize,
    ) -> [Vec<f64>; 5] {
        let n = l.tokens();
        let t = l.seq_len;
        let scale = 1.0 / (d as f64).sqrt();
        let (mut out, mut lse) = (vec![0.0; n * h * d], vec![0.0; n * h]);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; n * h * d],
            vec![0.0; n * kvh * d],
            vec![0.0; n * kvh * d],
        );
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
        };
        for i in 0..n {
            let row0 = i / t * t;
            let keys: Vec<usize> = (row0 + l.first_key(i)..=i).collect();
            for hq in 0..h {
                let g = hq / (h / kvh);
                let qi = &q[(i * h + hq) * d..][..d];
                let kv = |j: usize| (j * kvh + g) * d;
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(qi, &k[kv(j)..][..d]) * scale)
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let lsei = mx + sum.ln();
                lse[i * h + hq] = lsei;
                let p: Vec<f64> = s.iter().map(|x| (x - lsei).exp()).collect();
                let o = &mut out[(i * h + hq) * d..][..d];
                for (&j, pj) in keys.iter().zip(&p) {
                    for c in 0..d {
                        o[c] += pj * v[kv(j) + c] as f64;
                    }
                }
                let doi = &dout[(i * h + hq) * d..][..d];
                let big_d: f64 = (0..d).map(|c| doi[c] as f64 * o[c]).sum();
                for (&j, pj) in keys.iter().zip(&p) {
                    let ds = pj * (dot(doi, &v[kv(j)..][..d]) - big_d) * scale;
                    for c in 0..d {
                        dq[(i * h + hq) * d + c] += ds * k[kv(j) + c] as f64;
                        dk[kv(j) + c] += ds * qi[c] as f64;
                        dv[kv(j) + c] += pj * doi[c] as f64;
                    }
                }
            }
        }
        [out, lse, dq, dk, dv]
    }

    #[test]
    fn blocked_passes_match_the_definition_on_long_rows() {
        // Rows of 330 tokens span several query and key blocks; a window and packed documents
        // make blocks that are partly visible.
        let (h, kvh, d, t) = (4, 2, 8, 330);
        let layout = AttentionLayout::packed(&[vec![150, 180], vec![290]], t, Some(200));
        let n = layout.tokens();
        let q = random(n * h * d, 1);
        let k = random(n * kvh * d, 2);
        let v = random(n * kvh * d, 3);
        let dout = random(n * h * d, 4);
        let (out, lse) = run(&q, &k, &v, &layout, h, kvh, d);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward_f32(
            &q, &k, &v, &out, &lse, &dout, &layout, h, kvh, d, &mut dq, &mut dk, &mut dv,
        );
        let want = by_definition((&q, &k, &v, &dout), &layout, h, kvh, d);
        for (name, got, want) in [
            ("out", &out, &want[0]),
            ("lse", &lse, &want[1]),
            ("dq", &dq, &want[2]),
            ("dk", &dk, &want[3]),
            ("dv", &dv, &want[4]),
        ] {
            let worst = got
                .iter()
                .zip(want)
                .map(|(g, w)| (*g as f64 - w).abs() / (1.0 + w.abs()))
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{name}: worst relative error {worst:.2e}");
        }
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
        assert!((lse[0] - lanes::dot(&q[..2], &k[..2]) / 2f32.sqrt()).abs() < 1e-6);
    }
}
