//! The decoder's attention core, `softmax(Q Kᵀ·scale + bias) V` with grouped KV heads and an
//! arbitrary additive mask (causal plus padding), as one candle custom op with its backward.
//!
//! The composed version in `llama.rs` is a scaled copy of Q, a batched matmul that candle runs as
//! one single-threaded gemm per (batch, KV head), a broadcast add of the mask over every head, the
//! softmax, a second batched matmul and a transpose copy, each with backward nodes of its own. Here
//! rows of the batch run in parallel, query heads read their KV head through strides (no repeat),
//! the mask is added inside the softmax pass, the output is written straight into the
//! `[b, t, heads·d]` layout the output projection reads, and the probabilities are kept from the
//! forward pass for the backward pass.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{f32_slice, with_f32};
use super::sgemm::sgemm;
use super::softmax::{biased_softmax_rows, softmax_bwd_rows};

pub struct CausalAttentionOp {
    scale: f32,
    /// `[b, tq, tk]` additive bias (0 or `ops::MASK_VALUE`), shared by every head.
    bias: Vec<f32>,
    /// Attention probabilities `[b, heads, tq, tk]` saved by the forward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

/// Shapes of one call: batch, query heads, KV heads, query length, key length, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl CausalAttentionOp {
    pub fn new(scale: f32, bias: Vec<f32>) -> Self {
        Self {
            scale,
            bias,
            probs: Mutex::new(None),
        }
    }

    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let (&[b, nh, tq, d], &[bk, nkv, tk, dk]) = (q, k) else {
            bail!("fused causal attention: expected [b, heads, t, d] q and k, got {q:?} and {k:?}");
        };
        if bk != b || dk != d || v != k {
            bail!("fused causal attention: q {q:?}, k {k:?} and v {v:?} do not fit together");
        }
        if nkv == 0 || !nh.is_multiple_of(nkv) {
            bail!("fused causal attention: {nh} query heads for {nkv} KV heads");
        }
        if self.bias.len() != b * tq * tk {
            bail!(
                "fused causal attention: mask has {} entries, expected {b} x {tq} x {tk}",
                self.bias.len()
            );
        }
        Ok(Dims {
            b,
            nh,
            nkv,
            tq,
            tk,
            d,
        })
    }

    /// Context `[b, tq, nh·d]` into `out`, probabilities `[b, nh, tq, tk]` into `probs`.
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Dims,
        out: &mut [f32],
        probs: &mut [f32],
    ) {
        let Dims {
            nh, nkv, tq, tk, d, ..
        } = s;
        let rep = nh / nkv;
        let hd = nh * d;
        out.par_chunks_mut(tq * hd)
            .zip(probs.par_chunks_mut(nh * tq * tk))
            .enumerate()
            .for_each(|(bi, (o, p))| {
                let mask = &self.bias[bi * tq * tk..(bi + 1) * tq * tk];
                for h in 0..nh {
                    let qh = &q[(bi * nh + h) * tq * d..(bi * nh + h + 1) * tq * d];
                    let kv = (bi * nkv + h / rep) * tk * d;
                    let (kh, vh) = (&k[kv..kv + tk * d], &v[kv..kv + tk * d]);
                    let ph = &mut p[h * tq * tk..(h + 1) * tq * tk];
                    // S = scale · Q_h K_hᵀ (Kᵀ read through swapped strides).
                    sgemm(
                        (tq, tk, d),
                        ph,
                        (tk, 1),
                        false,
                        qh,
                        (d, 1),
                        kh,
                        (1, d),
                        self.scale,
                    );
                    biased_softmax_rows(ph, mask, tk, tk);
                    // O_h = P V_h, written into head h's columns of the [tq, nh·d] rows.
                    sgemm(
                        (tq, d, tk),
                        &mut o[h * d..],
                        (hd, 1),
                        false,
                        ph,
                        (tk, 1),
                        vh,
                        (d, 1),
                        1.0,
                    );
                }
            });
    }
}

impl CustomOp3 for CausalAttentionOp {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let q = f32_slice(s1, l1, self.name())?;
        let k = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; s.b * s.tq * s.nh * s.d];
        let mut probs = vec![0f32; s.b * s.nh * s.tq * s.tk];
        self.forward(q, k, v, s, &mut out, &mut probs);
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((s.b, s.tq, s.nh * s.d))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.dims(q.dims(), k.dims(), v.dims())?;
        let Dims {
            b,
            nh,
            nkv,
            tq,
            tk,
            d,
        } = s;
        let (rep, hd) = (nh / nkv, nh * d);
        let saved = self.probs.lock().ok().and_then(|mut p| p.take());
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |g| {
                        let probs = match saved {
                            Some(p) if p.len() == b * nh * tq * tk => p,
                            _ => {
                                let mut out = vec![0f32; b * tq * hd];
                                let mut probs = vec![0f32; b * nh * tq * tk];
                                self.forward(q, k, v, s, &mut out, &mut probs);
                                probs
                            }
                        };
                        let mut dq = vec![0f32; q.len()];
                        let mut dk = vec![0f32; k.len()];
                        let mut dv = vec![0f32; v.len()];
                        dq.par_chunks_mut(nh * tq * d)
                            .zip(dk.par_chunks_mut(nkv * tk * d))
                            .zip(dv.par_chunks_mut(nkv * tk * d))
                            .enumerate()
                            .for_each(|(bi, ((dq, dk), dv))| {
                                let go = &g[bi * tq * hd..(bi + 1) * tq * hd];
                                let mut ds = vec![0f32; tq * tk];
                                for h in 0..nh {
                                    let (kvh, first) = (h / rep, h % rep == 0);
                                    let qo = (bi * nh + h) * tq * d;
                                    let qh = &q[qo..qo + tq * d];
                                    let kv = (bi * nkv + kvh) * tk * d;
                                    let (kh, vh) = (&k[kv..kv + tk * d], &v[kv..kv + tk * d]);
                                    let dkh = &mut dk[kvh * tk * d..(kvh + 1) * tk * d];
                                    let off = (bi * nh + h) * tq * tk;
                                    let p = &probs[off..off + tq * tk];
                                    // dV_kv += Pᵀ dO_h (the heads sharing a KV head add up).
                                    let dvh = &mut dv[kvh * tk * d..(kvh + 1) * tk * d];
                                    sgemm(
                                        (tk, d, tq),
                                        dvh,
                                        (d, 1),
                                        !first,
                                        p,
                                        (1, tk),
                                        &go[h * d..],
                                        (hd, 1),
                                        1.0,
                                    );
                                    // dP = dO_h V_kvᵀ
                                    sgemm(
                                        (tq, tk, d),
                                        &mut ds,
                                        (tk, 1),
                                        false,
                                        &go[h * d..],
                                        (hd, 1),
                                        vh,
                                        (1, d),
                                        1.0,
                                    );
                                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
                                    softmax_bwd_rows(&mut ds, p, tk, self.scale);
                                    // dQ_h = dS K_kv,  dK_kv += dSᵀ Q_h
                                    sgemm(
                                        (tq, d, tk),
                                        &mut dq[h * tq * d..(h + 1) * tq * d],
                                        (d, 1),
                                        false,
                                        &ds,
                                        (tk, 1),
                                        kh,
                                        (d, 1),
                                        1.0,
                                    );
                                    sgemm(
                                        (tk, d, tq),
                                        dkh,
                                        (d, 1),
                                        !first,
                                        &ds,
                                        (1, tk),
                                        qh,
                                        (d, 1),
                                        1.0,
                                    );
                                }
                            });
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
