//! AdamW as one in-place pass per parameter, and the gradient sum of squares, as single
//! multi-threaded passes over f32 CPU data: the kernels under `train::optim::AdamW` (the one
//! optimiser production and the benchmarks use).
//!
//! The AdamW update and the gradient sum of squares as single multi-threaded passes over f32
//! CPU data. The composed version allocates a full-size tensor per op (about ten per parameter,
//! most of them single-threaded), which on a 49k-vocabulary embedding is a large share of a DPO
//! step. Every operation here mirrors one of candle's ops in the same order and precision
//! (`affine(a, b)` is `x·a + b` with `a`, `b` rounded to f32), so results match bit for bit.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;

use serde::{Deserialize, Serialize};

use super::cpu::{f32_slice, with_f32};
use super::isa::multiversion;

/// Hyper-parameters (the defaults are PyTorch's and candle's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// Whether the fused kernels can run on this parameter and gradient.
pub fn applies(var: &Var, g: &Tensor) -> bool {
    [var.as_tensor(), g]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The update's constants, each rounded to f32 where candle's `affine` would round it.
pub struct Consts {
    grad_scale: Option<f32>,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

impl Consts {
    pub fn new(cfg: &AdamWConfig, scale_m: f64, scale_v: f64, grad_scale: Option<f64>) -> Self {
        Self {
            grad_scale: grad_scale.map(|c| c as f32),
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            scale_m: scale_m as f32,
            scale_v: scale_v as f32,
            decay: (1f64 - cfg.lr * cfg.weight_decay) as f32,
            eps: cfg.eps as f32,
            lr: cfg.lr as f32,
        }
    }

    /// One element: `(θ', m', v')`. The `+ 0.0` terms are the zero offsets of candle's
    /// `affine`, kept so signed zeros come out the same.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = match self.grad_scale {
            Some(c) => g * c + 0.0,
            None => g,
        };
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let m_hat = m * self.scale_m + 0.0;
        let v_hat = v * self.scale_v + 0.0;
        let theta = p * self.decay + 0.0;
        let adjusted = m_hat / (v_hat.sqrt() * 1.0 + self.eps);
        (theta - (adjusted * self.lr + 0.0), m, v)
    }
}

/// Applies one AdamW update to `var` in place, with its moments `m` and `v` (as many values as
/// `var` has) updated in place too: one pass over four arrays, as PyTorch's fused AdamW makes,
/// instead of three freshly allocated results and a copy back into the parameter.
pub fn update_in_place(
    var: &Var,
    g: &Tensor,
    (m, v): (&mut [f32], &mut [f32]),
    c: &Consts,
) -> Result<()> {
    let n = var.elem_count();
    for (what, len) in [
        ("gradient", g.elem_count()),
        ("first moment", m.len()),
        ("second moment", v.len()),
    ] {
        if len != n {
            candle_core::bail!("AdamW: {what} has {len} entries, parameter {n}");
        }
    }
    let step = InPlaceStep {
        moments: Mutex::new((m, v)),
        c,
    };
    var.as_tensor().inplace_op2(&g.contiguous()?, &step)
}

/// [`update_in_place`] as the in-place op candle runs on the parameter's own storage.
struct InPlaceStep<'a> {
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    c: &'a Consts,
}

impl InplaceOp2 for InPlaceStep<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let CpuStorage::F32(p) = dst else {
            candle_core::bail!("AdamW: expected an f32 parameter");
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("AdamW: the parameter is not contiguous");
        };
        let p = &mut p[start..end];
        let g = f32_slice(g, g_l, self.name())?;
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("AdamW: moments lock poisoned".into()))?;
        let (m, v) = &mut *moments;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| update_chunk([p, m, v], g, self.c));
        Ok(())
    }
}

multiversion! {
    /// The update of one chunk in place: θ, m and v from themselves and the gradient `g`.
    fn update_chunk(state: [&mut [f32]; 3], g: &[f32], c: &Consts) {
        let [p, m, v] = state;
        for j in 0..p.len() {
            (p[j], m[j], v[j]) = c.apply(p[j], g[j], m[j], v[j]);
        }
    }
}

/// `Σ g²` in f64 for an f32 CPU tensor; `None` for anything else.
pub fn sq_sum(g: &Tensor) -> Result<Option<f64>> {
    if !g.device().is_cpu() || g.dtype() != DType::F32 {
        return Ok(None);
    }
    with_f32(g, |d| {
        // Partial sums are collected in order and added sequentially: rayon's own `sum`
        // reduces in an order that depends on scheduling, and a resumed run must repeat
        // the same clipping coefficient bit for bit.
        let parts: Vec<f64> = d
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        Ok(Some(parts.iter().sum()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::{supported, testing::values};

    #[test]
    fn the_update_is_bit_identical_on_every_instruction_set() {
        let n = 1037;
        let cfg = AdamWConfig::default();
        let c = Consts::new(
            &cfg,
            1.0 / (1.0 - 0.9f64.powi(3)),
            1.0 / (1.0 - 0.999f64.powi(3)),
            Some(0.5),
        );
        let old: Vec<Vec<f32>> = (0..4)
            .map(|i| values(n, 20 + i, 1.0))
            .map(|mut v| {
                // Second moments are never negative.
                v.iter_mut().for_each(|x| *x = x.abs());
                v
            })
            .collect();
        let run = |isa| {
            let mut state = old[..3].to_vec();
            let [p, m, v] = &mut state[..] else {
                unreachable!()
            };
            update_chunk_on(isa, [p, m, v], &old[3], &c);
            state
        };
        let want = run(crate::kernels::isa::Isa::Baseline);
        for isa in supported() {
            let got = run(isa);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert_eq!(g.to_bits(), w.to_bits(), "{isa:?}");
            }
        }
    }
}
