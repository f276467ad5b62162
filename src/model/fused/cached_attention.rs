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

use super::f32_slice;
use super::matvec::matmul_wt_into;

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
                // Scores transposed: st[j * rows + r] = q_r · k_j.
                let mut st = vec![0f32; len * rows];
                matmul_wt_into(qb, kb, rows, len, d, &mut st);
                let mut out = vec![0f32; rows * d];
                let mut p = vec![0f32; len];
                for r in 0..rows {
                    let i = r % tq;
                    let bias = &self.bias[(bi * tq + i) * len..][..len];
                    let mut max = f32::NEG_INFINITY;
                    for ((pj, &bj), s) in p.iter_mut().zip(bias).zip(st.chunks_exact(rows)) {
                        *pj = s[r] * self.scale + bj;
                        max = max.max(*pj);
                    }
                    let mut sum = 0f32;
                    for pj in p.iter_mut() {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    let o = &mut out[r * d..][..d];
                    for (&pj, vj) in p.iter().zip(vb.chunks_exact(d)) {
                        let w = pj / sum;
                        for (oo, &vv) in o.iter_mut().zip(vj) {
                            *oo += w * vv;
                        }
                    }
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
