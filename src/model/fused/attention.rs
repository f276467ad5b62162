//! Multi-head self-attention core (`softmax(QKᵀ·scale + mask)·V`) as one candle custom op with a
//! hand-written backward.
//!
//! candle's batched matmul runs one gemm per (batch, head) on a single core, and the composed
//! version also materialises the head transposes, the scaled and masked scores and the softmax
//! chain, each with its own backward node. Here Q, K and V stay in the `[b, t, heads·d]` layout the
//! projections produce (heads are addressed through strides), rows of the batch run in parallel,
//! and the attention probabilities are kept from the forward pass for the backward.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::kernels::{softmax_bwd_rows, softmax_row};
use super::sgemm::sgemm;
use super::{f32_slice, with_f32};

pub struct AttentionOp {
    heads: usize,
    scale: f32,
    /// `[b, t]` additive bias per key (0 or a large negative number for padding).
    mask_bias: Vec<f32>,
    /// Attention probabilities `[b, heads, t, t]` saved by the forward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    pub fn new(heads: usize, scale: f32, mask_bias: Vec<f32>) -> Self {
        Self {
            heads,
            scale,
            mask_bias,
            probs: Mutex::new(None),
        }
    }

    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let &[b, t, hd] = l.dims() else {
            bail!(
                "fused attention: expected [batch, seq, hidden] inputs, got {:?}",
                l.dims()
            );
        };
        if self.heads == 0 || !hd.is_multiple_of(self.heads) {
            bail!(
                "fused attention: hidden {hd} is not a multiple of {} heads",
                self.heads
            );
        }
        if self.mask_bias.len() != b * t {
            bail!(
                "fused attention: mask has {} entries, expected batch {b} x seq {t}",
                self.mask_bias.len()
            );
        }
        Ok((b, t, hd, hd / self.heads))
    }

    /// Computes the context `[b, t, hd]` into `out` and the probabilities into `probs`.
    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (t, hd, d): (usize, usize, usize),
        out: &mut [f32],
        probs: &mut [f32],
    ) {
        let heads = self.heads;
        out.par_chunks_mut(t * hd)
            .zip(probs.par_chunks_mut(heads * t * t))
            .enumerate()
            .for_each(|(bi, (o, p))| {
                let base = bi * t * hd;
                let (q, k, v) = (
                    &q[base..base + t * hd],
                    &k[base..base + t * hd],
                    &v[base..base + t * hd],
                );
                let mask = &self.mask_bias[bi * t..(bi + 1) * t];
                for h in 0..heads {
                    let ph = &mut p[h * t * t..(h + 1) * t * t];
                    // S = scale · Q_h K_hᵀ (K_hᵀ read through swapped strides).
                    sgemm(
                        (t, t, d),
                        ph,
                        (t, 1),
                        false,
                        &q[h * d..],
                        (hd, 1),
                        &k[h * d..],
                        (1, hd),
                        self.scale,
                    );
                    for row in ph.chunks_exact_mut(t) {
                        for (s, m) in row.iter_mut().zip(mask) {
                            *s += m;
                        }
                        softmax_row(row);
                    }
                    // O_h = P V_h, written straight into the [t, hd] layout.
                    sgemm(
                        (t, d, t),
                        &mut o[h * d..],
                        (hd, 1),
                        false,
                        ph,
                        (t, 1),
                        &v[h * d..],
                        (hd, 1),
                        1.0,
                    );
                }
            });
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (b, t, hd, d) = self.dims(l1)?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            bail!(
                "fused attention: q {:?}, k {:?} and v {:?} must have the same shape",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let q = f32_slice(s1, l1, self.name())?;
        let k = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; b * t * hd];
        let mut probs = vec![0f32; b * self.heads * t * t];
        self.forward(q, k, v, (t, hd, d), &mut out, &mut probs);
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        let (b, t, hd, d) = self.dims(q.layout())?;
        let heads = self.heads;
        let saved = self.probs.lock().ok().and_then(|mut p| p.take());
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |g| {
                        let probs = match saved {
                            Some(p) if p.len() == b * heads * t * t => p,
                            _ => {
                                let mut out = vec![0f32; b * t * hd];
                                let mut probs = vec![0f32; b * heads * t * t];
                                self.forward(q, k, v, (t, hd, d), &mut out, &mut probs);
                                probs
                            }
                        };
                        let mut dq = vec![0f32; b * t * hd];
                        let mut dk = vec![0f32; b * t * hd];
                        let mut dv = vec![0f32; b * t * hd];
                        dq.par_chunks_mut(t * hd)
                            .zip(dk.par_chunks_mut(t * hd))
                            .zip(dv.par_chunks_mut(t * hd))
                            .enumerate()
                            .for_each(|(bi, ((dq, dk), dv))| {
                                let base = bi * t * hd;
                                let span = base..base + t * hd;
                                let (q, k, v, go) = (
                                    &q[span.clone()],
                                    &k[span.clone()],
                                    &v[span.clone()],
                                    &g[span],
                                );
                                let mut ds = vec![0f32; t * t];
                                for h in 0..heads {
                                    let off = (bi * heads + h) * t * t;
                                    let p = &probs[off..off + t * t];
                                    // dV_h = Pᵀ dO_h
                                    sgemm(
                                        (t, d, t),
                                        &mut dv[h * d..],
                                        (hd, 1),
                                        false,
                                        p,
                                        (1, t),
                                        &go[h * d..],
                                        (hd, 1),
                                        1.0,
                                    );
                                    // dP = dO_h V_hᵀ
                                    sgemm(
                                        (t, t, d),
                                        &mut ds,
                                        (t, 1),
                                        false,
                                        &go[h * d..],
                                        (hd, 1),
                                        &v[h * d..],
                                        (1, hd),
                                        1.0,
                                    );
                                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
                                    softmax_bwd_rows(&mut ds, p, t, self.scale);
                                    // dQ_h = dS K_h, dK_h = dSᵀ Q_h
                                    sgemm(
                                        (t, d, t),
                                        &mut dq[h * d..],
                                        (hd, 1),
                                        false,
                                        &ds,
                                        (t, 1),
                                        &k[h * d..],
                                        (hd, 1),
                                        1.0,
                                    );
                                    sgemm(
                                        (t, d, t),
                                        &mut dk[h * d..],
                                        (hd, 1),
                                        false,
                                        &ds,
                                        (1, t),
                                        &q[h * d..],
                                        (hd, 1),
                                        1.0,
                                    );
                                }
                            });
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        let shape = q.shape();
        Ok((
            Some(Tensor::from_vec(dq, shape, q.device())?),
            Some(Tensor::from_vec(dk, shape, q.device())?),
            Some(Tensor::from_vec(dv, shape, q.device())?),
        ))
    }
}
