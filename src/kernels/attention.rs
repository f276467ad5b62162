//! Multi-head self-attention core (`softmax(QKᵀ·scale + mask)·V`) as one candle custom op with a
//! hand-written backward.
//!
//! candle's batched matmul runs one gemm per (batch, head) on a single core, and the composed
//! version also materialises the head transposes, the scaled and masked scores and the softmax
//! chain, each with its own backward node. Here Q, K and V stay in the layout the projections
//! produce, `[b, t, heads·d]` each or packed side by side as `[b, t, 3·heads·d]` (heads and the
//! three operands are addressed through strides), rows of the batch run in parallel, and the
//! attention probabilities are kept from the forward pass for the backward. The slice-level
//! [`forward`] and [`backward`] are shared with the whole-layer op in `layer.rs`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{f32_slice, with_f32};
use super::sgemm::sgemm;
use super::softmax::{biased_softmax_rows, softmax_bwd_rows};

pub struct AttentionOp {
    heads: usize,
    scale: f32,
    /// `[b, t]` additive bias per key (0 or a large negative number for padding).
    mask_bias: Vec<f32>,
    /// Attention probabilities `[b, heads, t, t]` saved by the forward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

/// Where one attention call finds its operands: `t` tokens of `heads` heads of `d` dims, each
/// token's q, k and v rows `ld` floats apart (`heads·d` for separate projections, `3·heads·d` when
/// they come packed from one projection), batch row `bi` starting at `bi·t·ld`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub t: usize,
    pub heads: usize,
    pub d: usize,
    pub ld: usize,
    pub scale: f32,
}

/// `(batch, seq, hidden)` of a `[batch, seq, hidden]` attention input, after checking that
/// `hidden` splits into `heads` and that the key mask has one entry per token; `op` names the
/// caller in the error.
pub(super) fn check_input(
    op: &str,
    l: &Layout,
    heads: usize,
    mask_len: usize,
) -> Result<(usize, usize, usize)> {
    let &[b, t, hd] = l.dims() else {
        bail!(
            "{op}: expected a [batch, seq, hidden] input, got {:?}",
            l.dims()
        );
    };
    if heads == 0 || !hd.is_multiple_of(heads) {
        bail!("{op}: hidden {hd} is not a multiple of {heads} heads");
    }
    if mask_len != b * t {
        bail!("{op}: mask has {mask_len} entries, expected batch {b} x seq {t}");
    }
    Ok((b, t, hd))
}

/// Computes the context `[b, t, heads·d]` into `out` and the probabilities `[b, heads, t, t]`
/// into `probs`; `mask` is `[b, t]`, added to every query's scores for that key. Batch rows run
/// in parallel, each on one thread.
pub(super) fn forward(
    g: Geom,
    [q, k, v]: [&[f32]; 3],
    mask: &[f32],
    out: &mut [f32],
    probs: &mut [f32],
) {
    let Geom {
        t,
        heads,
        d,
        ld,
        scale,
    } = g;
    let hd = heads * d;
    out.par_chunks_mut(t * hd)
        .zip(probs.par_chunks_mut(heads * t * t))
        .enumerate()
        .for_each(|(bi, (o, p))| {
            let base = bi * t * ld;
            let mask = &mask[bi * t..(bi + 1) * t];
            for h in 0..heads {
                let ph = &mut p[h * t * t..(h + 1) * t * t];
                // S = scale · Q_h K_hᵀ (K_hᵀ read through swapped strides).
                sgemm(
                    (t, t, d),
                    ph,
                    (t, 1),
                    false,
                    &q[base + h * d..],
                    (ld, 1),
                    &k[base + h * d..],
                    (1, ld),
                    scale,
                );
                biased_softmax_rows(ph, mask, 0, t);
                // O_h = P V_h, written straight into the [t, hd] layout.
                sgemm(
                    (t, d, t),
                    &mut o[h * d..],
                    (hd, 1),
                    false,
                    ph,
                    (t, 1),
                    &v[base + h * d..],
                    (ld, 1),
                    1.0,
                );
            }
        });
}

/// Gradients of [`forward`] from the saved `probs` and the context gradient `go` (`[b, t, hd]`):
/// written into `dqkv`, whose batch rows are `t·dld` floats, token rows `dld` apart, with dq, dk
/// and dv starting at offsets `doff` inside each token row.
pub(super) fn backward(
    g: Geom,
    [q, k, v]: [&[f32]; 3],
    probs: &[f32],
    go: &[f32],
    dqkv: &mut [f32],
    (dld, doff): (usize, [usize; 3]),
) {
    let Geom {
        t,
        heads,
        d,
        ld,
        scale,
    } = g;
    let hd = heads * d;
    dqkv.par_chunks_mut(t * dld)
        .enumerate()
        .for_each(|(bi, dst)| {
            let base = bi * t * ld;
            let go = &go[bi * t * hd..(bi + 1) * t * hd];
            let mut ds = vec![0f32; t * t];
            for h in 0..heads {
                let off = (bi * heads + h) * t * t;
                let p = &probs[off..off + t * t];
                // dV_h = Pᵀ dO_h
                sgemm(
                    (t, d, t),
                    &mut dst[doff[2] + h * d..],
                    (dld, 1),
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
                    &v[base + h * d..],
                    (1, ld),
                    1.0,
                );
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
                softmax_bwd_rows(&mut ds, p, t, scale);
                // dQ_h = dS K_h, dK_h = dSᵀ Q_h
                sgemm(
                    (t, d, t),
                    &mut dst[doff[0] + h * d..],
                    (dld, 1),
                    false,
                    &ds,
                    (t, 1),
                    &k[base + h * d..],
                    (ld, 1),
                    1.0,
                );
                sgemm(
                    (t, d, t),
                    &mut dst[doff[1] + h * d..],
                    (dld, 1),
                    false,
                    &ds,
                    (1, t),
                    &q[base + h * d..],
                    (ld, 1),
                    1.0,
                );
            }
        });
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
        let (b, t, hd) = check_input("fused attention", l, self.heads, self.mask_bias.len())?;
        Ok((b, t, hd, hd / self.heads))
    }

    fn geom(&self, t: usize, hd: usize) -> Geom {
        Geom {
            t,
            heads: self.heads,
            d: hd / self.heads,
            ld: hd,
            scale: self.scale,
        }
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
        let (b, t, hd, _) = self.dims(l1)?;
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
        forward(
            self.geom(t, hd),
            [q, k, v],
            &self.mask_bias,
            &mut out,
            &mut probs,
        );
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
        let (b, t, hd, _) = self.dims(q.layout())?;
        let geom = self.geom(t, hd);
        let saved = self.probs.lock().ok().and_then(|mut p| p.take());
        // One [b, t, 3·hd] buffer holds dq, dk and dv side by side; the three gradients are
        // strided views of it.
        let dqkv = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |g| {
                        let probs = match saved {
                            Some(p) if p.len() == b * self.heads * t * t => p,
                            _ => {
                                let mut out = vec![0f32; b * t * hd];
                                let mut probs = vec![0f32; b * self.heads * t * t];
                                forward(geom, [q, k, v], &self.mask_bias, &mut out, &mut probs);
                                probs
                            }
                        };
                        let mut dqkv = vec![0f32; b * t * 3 * hd];
                        backward(
                            geom,
                            [q, k, v],
                            &probs,
                            g,
                            &mut dqkv,
                            (3 * hd, [0, hd, 2 * hd]),
                        );
                        Ok(dqkv)
                    })
                })
            })
        })?;
        let dqkv = Tensor::from_vec(dqkv, (b, t, 3 * hd), q.device())?;
        Ok((
            Some(dqkv.narrow(2, 0, hd)?),
            Some(dqkv.narrow(2, hd, hd)?),
            Some(dqkv.narrow(2, 2 * hd, hd)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded keys (bias −1e9) must get probability exactly 0, never a subnormal: subnormals fed
    /// to the attention gemms cost a microcode assist per FMA on Intel cores (`threads.rs`).
    #[test]
    fn padded_keys_give_exact_zeros_and_no_subnormals_forward_or_backward() {
        let (b, t, heads, d) = (2, 40, 2, 8);
        let hd = heads * d;
        let data = |seed: f32| -> Vec<f32> {
            (0..b * t * hd)
                .map(|i| ((i as f32 * 0.37 + seed).sin()) * 3.0)
                .collect()
        };
        let (q, k, v, go) = (data(0.1), data(0.7), data(1.3), data(2.1));
        // Row 0 has 7 real tokens, row 1 all 40.
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i < t && i % t >= 7 { -1.0e9 } else { 0.0 })
            .collect();
        let g = Geom {
            t,
            heads,
            d,
            ld: hd,
            scale: 0.35,
        };
        let mut out = vec![0f32; b * t * hd];
        let mut probs = vec![0f32; b * heads * t * t];
        forward(g, [&q, &k, &v], &mask, &mut out, &mut probs);
        for (i, &p) in probs.iter().enumerate() {
            assert!(p == 0.0 || p.is_normal(), "prob {i} = {p:e} is subnormal");
        }
        // Batch row 0, every head and query: keys 7.. are padding.
        for row in probs[..heads * t * t].chunks_exact(t) {
            assert!(row[7..].iter().all(|&p| p == 0.0), "{:?}", &row[7..]);
            assert!((row[..7].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let mut dqkv = vec![0f32; b * t * 3 * hd];
        backward(
            g,
            [&q, &k, &v],
            &probs,
            &go,
            &mut dqkv,
            (3 * hd, [0, hd, 2 * hd]),
        );
        for (i, &x) in dqkv.iter().enumerate() {
            assert!(
                x == 0.0 || x.is_normal(),
                "gradient {i} = {x:e} is subnormal"
            );
        }
        // Padded keys of row 0 get no key or value gradient.
        for tok in 7..t {
            let at = tok * 3 * hd;
            assert!(dqkv[at + hd..at + 3 * hd].iter().all(|&x| x == 0.0));
        }
    }
}
