//! Attention of new queries over a preallocated key/value cache, as one CPU op: the attention
//! of a generation step.
//!
//! Per decode step and layer, the composed version (scale, reshape, two batched matmuls, bias
//! add, softmax, transposes) is about ten candle ops on a few thousand floats each, and each of
//! candle's matmuls re-reads `/proc/cpuinfo` to size its thread pool (~80 µs here). This op
//! reads the queries, the first `len` cached positions of a `[batch, kv_heads, capacity,
//! head_dim]` cache buffer (no copy of the cache, which the growing `cat` made every step) and
//! the additive mask, and writes `[batch, q_len, heads·head_dim]` directly. Query heads that
//! share a KV head (grouped-query attention) are one block of rows against the same keys, so
//! the scores are a product of the streaming kernel in [`super::matvec`]. Work is split over
//! rayon's threads by (batch row, KV head).
//!
//! Generation needs no gradients, and the cache is written in place, so the op has no backward:
//! candle reports an error if one is requested. Training runs the uncached forward pass.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::cpu::f32_slice;
use super::math::exp_minus_max;
use super::matvec::{dispatch, matmul_wt_into, prefetch_all};
use pulp::{Simd, WithSimd};

/// Shapes and constants of one call.
pub struct CachedAttention {
    pub heads: usize,
    /// Valid cached positions (keys `0..len` of each buffer).
    pub len: usize,
    pub scale: f32,
    /// `[batch, q_len, len]` additive mask (0 or a large negative value).
    pub bias: Vec<f32>,
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    /// Inputs: `q` `[b, heads, tq, d]`, `k` and `v` buffers `[b, kv_heads, capacity, d]`.
    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[b, heads, tq, d], &[bk, kv, cap, dk]) = (lq.dims(), lk.dims()) else {
            bail!(
                "cached-attention: expected q [b, heads, t, d] and k [b, kv, cap, d], got {:?} and {:?}",
                lq.dims(),
                lk.dims()
            );
        };
        if lv.dims() != lk.dims()
            || bk != b
            || dk != d
            || heads != self.heads
            || kv == 0
            || !heads.is_multiple_of(kv)
            || self.len > cap
            || self.len < tq
            || self.bias.len() != b * tq * self.len
        {
            bail!(
                "cached-attention: inconsistent shapes q {:?}, k {:?}, v {:?}, {} valid keys, {} mask values",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.len,
                self.bias.len()
            );
        }
        let q = f32_slice(sq, lq, "cached-attention")?;
        let k = f32_slice(sk, lk, "cached-attention")?;
        let v = f32_slice(sv, lv, "cached-attention")?;
        let (rep, len) = (heads / kv, self.len);
        let rows = rep * tq;
        // One block per (batch row, KV head): the `rep·tq` query rows that read its keys.
        let blocks: Vec<Vec<f32>> = (0..b * kv)
            .into_par_iter()
            .map(|bg| {
                let (bi, g) = (bg / kv, bg % kv);
                let qb = &q[(bi * heads + g * rep) * tq * d..][..rows * d];
                let kb = &k[bg * cap * d..][..len * d];
                let vb = &v[bg * cap * d..][..len * d];
                // The cache is tens of MB, read once per step from memory: start loading this
                // block's values (read after the keys) and the next block's keys now, so that
                // several blocks' misses are in flight instead of one stream at a time.
                prefetch_all(vb);
                if bg + 1 < b * kv {
                    prefetch_all(&k[(bg + 1) * cap * d..][..len * d]);
                }
                // scores[r·len + j] = q_r · k_j: the keys are the streaming kernel's input rows
                // (tiles of several keys per query row), which leaves each query's scores
                // contiguous for the softmax.
                let mut scores = vec![0f32; rows * len];
                matmul_wt_into(kb, qb, len, rows, d, &mut scores);
                let mut out = vec![0f32; rows * d];
                for (r, (s, o)) in scores
                    .chunks_exact_mut(len)
                    .zip(out.chunks_exact_mut(d))
                    .enumerate()
                {
                    let bias = &self.bias[(bi * tq + r % tq) * len..][..len];
                    for (sj, &bj) in s.iter_mut().zip(bias) {
                        *sj = *sj * self.scale + bj;
                    }
                    let sum = exp_minus_max(s);
                    weighted_sum_of_rows(s, vb, o);
                    let inv = 1.0 / sum;
                    o.iter_mut().for_each(|x| *x *= inv);
                }
                out
            })
            .collect();
        // Scatter to [b, tq, heads·d]: block row r = (head h within the group)·tq + i.
        let mut y = vec![0f32; b * tq * heads * d];
        for (bg, block) in blocks.iter().enumerate() {
            let (bi, g) = (bg / kv, bg % kv);
            for (r, row) in block.chunks_exact(d).enumerate() {
                let (h, i) = (g * rep + r / tq, r % tq);
                y[((bi * tq + i) * heads + h) * d..][..d].copy_from_slice(row);
            }
        }
        Ok((CpuStorage::F32(y), (b, tq, heads * d).into()))
    }
}

/// `out = Σ_j p[j] · v[j]` for the rows `v[j]` (each `out.len()` long) of a row-major block:
/// the attention-weighted sum of the cached values, with the widest SIMD this CPU has.
fn weighted_sum_of_rows(p: &[f32], v: &[f32], out: &mut [f32]) {
    dispatch(WeightedSum { p, v, out });
}

/// Output registers per pass of [`weighted_sum_of_rows`]: kept in registers over all the rows,
/// since accumulating in memory makes every row wait for the previous row's store.
const SUM_REGISTERS: usize = 4;

struct WeightedSum<'a> {
    p: &'a [f32],
    v: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for WeightedSum<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { p, v, out } = self;
        let d = out.len();
        let (oh, ot) = S::as_mut_simd_f32s(out);
        let rows = || p.iter().zip(v.chunks_exact(d));
        let mut c = 0;
        while c < oh.len() {
            let width = SUM_REGISTERS.min(oh.len() - c);
            let mut acc = [simd.splat_f32s(0.0); SUM_REGISTERS];
            for (&pj, vj) in rows() {
                let w = simd.splat_f32s(pj);
                let vh = &S::as_simd_f32s(vj).0[c..c + width];
                for (a, &vv) in acc.iter_mut().zip(vh) {
                    *a = simd.mul_add_e_f32s(w, vv, *a);
                }
            }
            oh[c..c + width].copy_from_slice(&acc[..width]);
            c += width;
        }
        let tail = d - ot.len();
        for (o, col) in ot.iter_mut().zip(tail..) {
            *o = rows().map(|(&pj, vj)| pj * vj[col]).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_matches_the_plain_sum_for_any_row_width() {
        // Widths below one register, exactly one, a multiple of the 4-register pass plus a
        // partial pass, and one with a scalar tail.
        for d in [3, 8, 40, 64, 70] {
            let rows = 13;
            let p: Vec<f32> = (0..rows).map(|j| 0.1 + j as f32 * 0.05).collect();
            let v: Vec<f32> = (0..rows * d).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let mut out = vec![f32::NAN; d];
            weighted_sum_of_rows(&p, &v, &mut out);
            for (c, &got) in out.iter().enumerate() {
                let want: f32 = (0..rows).map(|j| p[j] * v[j * d + c]).sum();
                assert!(
                    (got - want).abs() < 1e-4,
                    "d={d}, column {c}: {got} vs {want}"
                );
            }
        }
    }
}
