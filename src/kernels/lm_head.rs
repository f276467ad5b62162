//! The LM head and log-softmax-gather as one op: per-row log-probability of a target id under
//! `softmax(hidden · weightᵀ)`, chunk by chunk, never holding the `[rows, vocab]` logits as a
//! graph tensor. Reference twin: [`super::reference::lm_head_logprobs`].

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, par_rows, with_f32};
use super::isa::multiversion;
use super::math::{self, row_logsumexp, softmax_row};
use super::sgemm::sgemm_threads;

pub struct LmHeadLogprobs {
    pub(super) targets: Vec<u32>,
    pub(super) chunk: usize,
    pub(super) device: Device,
    /// Each row's log-sum-exp, written by the forward pass so the backward pass needs only
    /// one sweep over the recomputed logits instead of three.
    pub(super) lse: Mutex<Option<Vec<f32>>>,
    /// Whether the forward pass keeps each chunk's softmax for the backward pass (set when a
    /// gradient will be taken and the probabilities fit [`KEEP_PROBS_MAX`]): the backward then
    /// skips recomputing the logits, a third of the head's work.
    pub(super) keep_probs: bool,
    pub(super) probs: Mutex<Option<Vec<Vec<f32>>>>,
}

/// Largest `rows × vocab` softmax (in floats: 512 MiB) the fused LM-head op keeps from its
/// forward pass for the backward pass; above it the logits are recomputed chunk by chunk.
pub const KEEP_PROBS_MAX: usize = 1 << 27;

impl LmHeadLogprobs {
    /// `logits = hidden[start..start+len] · weightᵀ` into `buf` (`[len, vocab]`), on candle's
    /// threads. The weight is read through swapped strides, so neither input is copied.
    fn chunk_logits(
        &self,
        hidden: &[f32],
        weight: &[f32],
        (start, len): (usize, usize),
        (vocab, d): (usize, usize),
        buf: &mut Vec<f32>,
    ) {
        buf.resize(len * vocab, 0.0);
        sgemm_threads(
            (len, vocab, d),
            buf,
            (vocab, 1),
            false,
            &hidden[start * d..(start + len) * d],
            (d, 1),
            weight,
            (1, d),
            1.0,
            candle_core::utils::get_num_threads(),
        );
    }
}

impl CustomOp2 for LmHeadLogprobs {
    fn name(&self) -> &'static str {
        "lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hidden = f32_slice(s1, l1, "lm-head-logprobs")?;
        let weight = f32_slice(s2, l2, "lm-head-logprobs")?;
        let (rows, d, vocab) = lm_head_dims(l1, l2)?;
        let mut out = vec![0f32; rows];
        let mut lse = vec![0f32; rows];
        let mut logits = Vec::new();
        let mut kept = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = self.chunk.min(rows - start);
            self.chunk_logits(hidden, weight, (start, len), (vocab, d), &mut logits);
            let targets = &self.targets[start..start + len];
            let picked: Vec<f32> = (0..len)
                .map(|k| logits[k * vocab + targets[k] as usize])
                .collect();
            let lse_chunk = &mut lse[start..start + len];
            if self.keep_probs {
                // One exp pass: each row becomes its softmax, kept for the backward pass.
                logits
                    .par_chunks_mut(vocab)
                    .zip(lse_chunk.par_iter_mut())
                    .for_each(|(row, l)| *l = softmax_row_lse(row));
                kept.push(std::mem::take(&mut logits));
            } else {
                let data = &logits;
                par_rows(lse_chunk, 1, |r0, block| {
                    let rows = &data[r0 * vocab..(r0 + block.len()) * vocab];
                    logsumexp_rows(block, rows, vocab);
                });
            }
            for k in 0..len {
                out[start + k] = picked[k] - lse[start + k];
            }
            start += len;
        }
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        if self.keep_probs
            && let Ok(mut slot) = self.probs.lock()
        {
            *slot = Some(kept);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d logp_r / d logits_r = onehot(target_r) − softmax(logits_r), scaled by the incoming
        // gradient of row r. The chunk's logits are recomputed rather than kept from forward
        // (rows × vocab floats would be the largest buffer of the step), turned into dlogits in
        // place, and both products write straight into the two gradients: dW accumulates over
        // chunks inside the gemm, so no [vocab, d] temporary is allocated per chunk.
        let (rows, d) = hidden.dims2()?;
        let vocab = weight.dim(0)?;
        let grad = grad_res.detach().to_vec1::<f32>()?;
        let saved = self.lse.lock().ok().and_then(|mut s| s.take());
        let mut kept = self
            .probs
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .filter(|k| k.len() == rows.div_ceil(self.chunk))
            .map(Vec::into_iter);
        let threads = candle_core::utils::get_num_threads();
        let hidden = hidden.detach().contiguous()?;
        let weight = weight.detach().contiguous()?;
        let (grad_hidden, grad_weight) = with_f32(&hidden, |h| {
            with_f32(&weight, |w| {
                let mut gh = vec![0f32; rows * d];
                let mut gw = vec![0f32; vocab * d];
                let mut logits = Vec::new();
                let mut start = 0;
                while start < rows {
                    let len = self.chunk.min(rows - start);
                    // The chunk's softmax, kept from forward, or its logits recomputed.
                    let probs = match kept.as_mut().and_then(Iterator::next) {
                        Some(p) => {
                            logits = p;
                            true
                        }
                        None => {
                            self.chunk_logits(h, w, (start, len), (vocab, d), &mut logits);
                            false
                        }
                    };
                    let targets = &self.targets[start..start + len];
                    let g = &grad[start..start + len];
                    let lse = saved.as_ref().map(|l| &l[start..start + len]);
                    par_rows(&mut logits, vocab, |r0, block| {
                        let r = r0..r0 + block.len() / vocab;
                        let lse = lse.map(|l| &l[r.clone()]);
                        logit_grads(block, vocab, probs, lse, (&g[r.clone()], &targets[r]));
                    });
                    // grad_hidden rows = dlogits · W.
                    sgemm_threads(
                        (len, d, vocab),
                        &mut gh[start * d..(start + len) * d],
                        (d, 1),
                        false,
                        &logits,
                        (vocab, 1),
                        w,
                        (d, 1),
                        1.0,
                        threads,
                    );
                    // grad_weight += dlogitsᵀ · hidden rows.
                    sgemm_threads(
                        (vocab, d, len),
                        &mut gw,
                        (d, 1),
                        start > 0,
                        &logits,
                        (1, vocab),
                        &h[start * d..(start + len) * d],
                        (d, 1),
                        1.0,
                        threads,
                    );
                    start += len;
                }
                Ok((gh, gw))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(grad_hidden, (rows, d), &self.device)?),
            Some(Tensor::from_vec(grad_weight, (vocab, d), &self.device)?),
        ))
    }
}

/// `(rows, d, vocab)` of the fused LM-head op's inputs, checked against each other.
fn lm_head_dims(hidden: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
    let (&[rows, d], &[vocab, dw]) = (hidden.dims(), weight.dims()) else {
        candle_core::bail!(
            "lm-head-logprobs expects [rows, d] hidden and [vocab, d] weight, got {:?} and {:?}",
            hidden.dims(),
            weight.dims()
        );
    };
    if d != dw {
        candle_core::bail!("lm-head-logprobs: hidden width {d} but weight width {dw}");
    }
    Ok((rows, d, vocab))
}

multiversion! {
    /// In-place softmax of one row; returns its log-sum-exp.
    fn softmax_row_lse(row: &mut [f32]) -> f32 {
        softmax_row(row)
    }
}

multiversion! {
    /// `out[k] = log Σ exp(rows[k])` for every `vocab`-wide row.
    fn logsumexp_rows(out: &mut [f32], rows: &[f32], vocab: usize) {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(vocab)) {
            *o = row_logsumexp(row);
        }
    }
}

multiversion! {
    /// Turns a block of `vocab`-wide rows into the gradients of the picked log-probabilities
    /// in place: `g·(onehot(target) − softmax)` per row, from rows that already hold the
    /// softmax (`probs`) or the logits (whose log-sum-exp is `lse` when saved, else computed).
    fn logit_grads(
        block: &mut [f32],
        vocab: usize,
        probs: bool,
        lse: Option<&[f32]>,
        grads_targets: (&[f32], &[u32]),
    ) {
        let (g, targets) = grads_targets;
        for (k, row) in block.chunks_exact_mut(vocab).enumerate() {
            let scale = -g[k];
            if probs {
                row.iter_mut().for_each(|x| *x *= scale);
            } else {
                let l = match lse {
                    Some(l) => l[k],
                    None => row_logsumexp(row),
                };
                for x in row.iter_mut() {
                    *x = scale * math::exp(*x - l);
                }
            }
            row[targets[k] as usize] += g[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn log_probability_gradients_agree_on_every_instruction_set() {
        let (rows, vocab) = (3, 101);
        let logits = values(rows * vocab, 16, 10.0);
        let g = values(rows, 17, 1.0);
        let targets = [0u32, 50, 100];
        let mut lse = vec![0.0; rows];
        logsumexp_rows(&mut lse, &logits, vocab);
        every_isa_agrees("log-sum-exp", 1e-6, |isa| {
            let mut out = vec![0.0; rows];
            logsumexp_rows_on(isa, &mut out, &logits, vocab);
            out
        });
        for saved in [None, Some(&lse[..])] {
            every_isa_agrees("logit gradients", 1e-6, |isa| {
                let mut block = logits.clone();
                logit_grads_on(isa, &mut block, vocab, false, saved, (&g, &targets));
                block
            });
        }
        let mut probs = logits.clone();
        let kept: Vec<f32> = probs.chunks_exact_mut(vocab).map(softmax_row_lse).collect();
        for (k, l) in kept.iter().zip(&lse) {
            assert!((k - l).abs() < 1e-5);
        }
        every_isa_agrees("logit gradients from kept softmax", 1e-6, |isa| {
            let mut block = probs.clone();
            logit_grads_on(isa, &mut block, vocab, true, None, (&g, &targets));
            block
        });
    }
}
