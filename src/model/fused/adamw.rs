//! AdamW as one in-place pass over each parameter.
//!
//! candle-nn's `AdamW` spends ~10 tensor ops per parameter per step, each allocating a full-size
//! result; for MiniLM's 11.7M-entry word-embedding table alone that is hundreds of megabytes of
//! traffic. This optimiser keeps the moments as plain vectors and updates parameter and moments in
//! one fused, multi-threaded loop, writing the parameter in place through candle's in-place op.
//! The update rule is candle's (and PyTorch's) decoupled-weight-decay AdamW:
//! `θ ← θ·(1 − lr·λ) − lr·m̂/(√v̂ + ε)`.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Var, backprop::GradStore, bail};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

use super::f32_slice;

struct State {
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Drop-in replacement for `candle_nn::AdamW` for f32 parameters on the CPU.
pub struct FusedAdamW {
    states: Vec<State>,
    params: ParamsAdamW,
    step_t: i32,
}

impl std::fmt::Debug for FusedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedAdamW")
            .field("params", &self.params)
            .field("vars", &self.states.len())
            .field("step", &self.step_t)
            .finish()
    }
}

struct Update<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    scale_m: f32,
    scale_v: f32,
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = f32_slice(s2, l2, self.name())?;
        let Some((start, end)) = l1.contiguous_offsets() else {
            bail!("fused-adamw: parameter is not contiguous");
        };
        let CpuStorage::F32(p) = s1 else {
            bail!("fused-adamw: parameter must be f32, got {:?}", s1.dtype());
        };
        let p = &mut p[start..end];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            bail!(
                "fused-adamw: gradient has {} entries, parameter {}",
                g.len(),
                p.len()
            );
        }
        let Self {
            lr,
            decay,
            beta1,
            beta2,
            eps,
            scale_m,
            scale_v,
            ..
        } = *self;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    let m_hat = *m * scale_m;
                    let v_hat = *v * scale_v;
                    *p = *p * decay - lr * m_hat / (v_hat.sqrt() + eps);
                }
            });
        Ok(())
    }
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let mut states = Vec::with_capacity(vars.len());
        for var in vars {
            if !var.dtype().is_float() {
                continue;
            }
            if var.dtype() != DType::F32 || !var.device().is_cpu() {
                bail!(
                    "FusedAdamW handles f32 CPU parameters, got {:?} on {:?}\nhint: use candle_nn::AdamW on other devices",
                    var.dtype(),
                    var.device().location()
                );
            }
            let n = var.elem_count();
            states.push(State {
                var,
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        }
        Ok(Self {
            states,
            params,
            step_t: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let lr = p.lr as f32;
        let template = (
            lr,
            (1.0 - p.lr * p.weight_decay) as f32,
            p.beta1 as f32,
            p.beta2 as f32,
            p.eps as f32,
            (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32,
            (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32,
        );
        for state in &mut self.states {
            let Some(g) = grads.get(&state.var) else {
                continue;
            };
            let g = g.contiguous()?;
            let (lr, decay, beta1, beta2, eps, scale_m, scale_v) = template;
            let op = Update {
                m: RefCell::new(&mut state.m),
                v: RefCell::new(&mut state.v),
                lr,
                decay,
                beta1,
                beta2,
                eps,
                scale_m,
                scale_v,
            };
            state.var.inplace_op2(&g, &op)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}
