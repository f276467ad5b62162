//! Our AdamW, gradient clipping and gradient finiteness checks.
//!
//! candle-nn's `AdamW` keeps its moments private, so a run cannot be resumed from a checkpoint
//! with the same optimiser state. This one performs exactly the same tensor operations in the same
//! order (decoupled weight decay `θ·(1 - lr·λ)`, bias-corrected moments; the tests check it
//! bit-for-bit against candle's), names every parameter, and saves/loads `(m, v, step)` as
//! safetensors, so N steps equal k steps + save + load + (N - k) steps exactly.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result as CResult, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

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

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    cfg: AdamWConfig,
}

const STEP_KEY: &str = "__step__";

impl AdamW {
    /// Optimiser over `params` (non-float ones are ignored, as in candle); names must be unique.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> anyhow::Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                bail!("parameter name {name:?} appears twice in the optimiser");
            }
            if !var.dtype().is_float() {
                continue;
            }
            let m = Tensor::zeros(var.shape(), var.dtype(), var.device())?;
            let v = Tensor::zeros(var.shape(), var.dtype(), var.device())?;
            slots.push(Slot { name, var, m, v });
        }
        Ok(Self {
            slots,
            step: 0,
            cfg,
        })
    }

    /// Optimiser over every variable of a `VarMap`, in name order (deterministic).
    pub fn from_varmap(varmap: &VarMap, cfg: AdamWConfig) -> anyhow::Result<Self> {
        Self::new(named_vars(varmap), cfg)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate for the next step (schedules call this before each step).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// `(name, var)` of every optimised parameter.
    pub fn params(&self) -> Vec<(&str, &Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), &s.var))
            .collect()
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> CResult<()> {
        self.step_scaled(grads, None)
    }

    /// [`Self::step`] with every gradient first multiplied by `grad_scale` (gradient clipping
    /// folded into the update, so the clipped gradients are never materialised). The result is
    /// bit-identical to scaling the gradients with `affine(grad_scale, 0)` and calling `step`.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: Option<f64>) -> CResult<()> {
        self.step += 1;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let scale_m = 1f64 / (1f64 - beta1.powi(t));
        let scale_v = 1f64 / (1f64 - beta2.powi(t));
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            if fused::applies(&s.var, g, &s.m, &s.v) {
                let c = fused::Consts::new(&self.cfg, scale_m, scale_v, grad_scale);
                let (m, v) = fused::update(&s.var, g, &s.m, &s.v, &c)?;
                s.m = m;
                s.v = v;
                continue;
            }
            let scaled;
            let g = match grad_scale {
                Some(c) => {
                    scaled = g.affine(c, 0.0)?;
                    &scaled
                }
                None => g,
            };
            // Same op order as candle_nn::AdamW, so the two agree bit for bit.
            let next_m = ((&s.m * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&s.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (s.var.as_tensor() * (1f64 - lr * weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            s.m = next_m;
            s.v = next_v;
            s.var.set(&next_theta)?;
        }
        Ok(())
    }

    /// `loss.backward()` then [`Self::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> CResult<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Writes `m.<name>`, `v.<name>` and the step count to a safetensors file.
    pub fn save_state(&self, path: &Path) -> anyhow::Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        let step = i64::try_from(self.step).context("optimiser step count overflows i64")?;
        map.insert(STEP_KEY.to_string(), Tensor::new(&[step], &Device::Cpu)?);
        candle_core::safetensors::save(&map, path)
            .with_context(|| format!("writing optimiser state to {}", path.display()))
    }

    /// Restores a state written by [`Self::save_state`]; every parameter must be present with its
    /// shape (a changed model is an error, not a silent fresh start).
    pub fn load_state(&mut self, path: &Path) -> anyhow::Result<()> {
        let dev = self
            .slots
            .first()
            .map_or(Device::Cpu, |s| s.var.device().clone());
        let map = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading optimiser state from {}", path.display()))?;
        let step = map
            .get(STEP_KEY)
            .with_context(|| {
                format!(
                    "{} has no step count; is it an optimiser state?",
                    path.display()
                )
            })?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let step = *step.first().context("empty step tensor")?;
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |k: String| -> anyhow::Result<Tensor> {
                let t = map.get(&k).with_context(|| {
                    format!(
                        "optimiser state {} lacks {k}\nhint: the model's parameters changed since the checkpoint; start a fresh run",
                        path.display()
                    )
                })?;
                if t.dims() != s.var.dims() {
                    bail!(
                        "optimiser state {k} has shape {:?} but the parameter has {:?}",
                        t.dims(),
                        s.var.dims()
                    );
                }
                Ok(t.to_dtype(s.var.dtype())?)
            };
            restored.push((get(format!("m.{}", s.name))?, get(format!("v.{}", s.name))?));
        }
        for (s, (m, v)) in self.slots.iter_mut().zip(restored) {
            s.m = m;
            s.v = v;
        }
        self.step = u64::try_from(step).context("negative step count in optimiser state")?;
        Ok(())
    }
}

/// Every variable of a `VarMap` as `(name, var)`, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Global L2 norm of the gradients of `params` (f64 accumulation).
pub fn grad_norm<'a>(grads: &GradStore, params: impl IntoIterator<Item = &'a Var>) -> CResult<f64> {
    let mut sq = 0f64;
    for var in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            sq += grad_sq_sum(g)?;
        }
    }
    Ok(sq.sqrt())
}

/// `Σ g²` of one gradient in f64: one parallel pass over f32 CPU data, candle's ops elsewhere.
/// Not finite exactly when some entry is NaN or infinite (squares of finite f32 values cannot
/// overflow f64), which is what lets one pass serve both the norm and the finiteness guard.
pub fn grad_sq_sum(g: &Tensor) -> CResult<f64> {
    if let Some(s) = fused::sq_sum(g)? {
        return Ok(s);
    }
    g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Scales the gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, applied only when below 1) and
/// returns the norm before clipping. A non-finite norm leaves the gradients untouched, for the
/// guard to report.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(&str, &Var)],
    max_norm: f64,
) -> CResult<f64> {
    let norm = grad_norm(grads, params.iter().map(|(_, v)| *v))?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, var) in params {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Name of the first parameter (in `params` order) whose gradient holds a NaN or an infinity.
pub fn first_non_finite_grad(
    grads: &GradStore,
    params: &[(&str, &Var)],
) -> CResult<Option<String>> {
    for (name, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            // x·0 is 0 for finite x and NaN for ±inf/NaN, so the sum is NaN iff one is bad.
            let probe = g
                .affine(0.0, 0.0)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !probe.is_finite() {
                return Ok(Some((*name).to_string()));
            }
        }
    }
    Ok(None)
}

/// The AdamW update and the gradient sum of squares as single multi-threaded passes over f32
/// CPU data. The composed version allocates a full-size tensor per op (about ten per parameter,
/// most of them single-threaded), which on a 49k-vocabulary embedding is a large share of a DPO
/// step. Every operation here mirrors one of candle's ops in the same order and precision
/// (`affine(a, b)` is `x·a + b` with `a`, `b` rounded to f32), so results match bit for bit.
mod fused {
    use candle_core::{DType, Result, Storage, Tensor, Var};
    use rayon::prelude::*;

    use super::AdamWConfig;

    /// Elements per rayon task.
    const CHUNK: usize = 1 << 14;

    /// Whether the fused kernels can run on these tensors.
    pub(super) fn applies(var: &Var, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
        [var.as_tensor(), g, m, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
    }

    /// The update's constants, each rounded to f32 where candle's `affine` would round it.
    pub(super) struct Consts {
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
        pub(super) fn new(
            cfg: &AdamWConfig,
            scale_m: f64,
            scale_v: f64,
            grad_scale: Option<f64>,
        ) -> Self {
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

    /// Runs `f` on the contiguous f32 data of a CPU tensor.
    fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("fused AdamW: tensor is not on the CPU");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused AdamW: tensor is not contiguous");
        };
        f(&cpu.as_slice::<f32>()?[a..b])
    }

    /// Applies one AdamW update to `var` and returns the new moments.
    pub(super) fn update(
        var: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        c: &Consts,
    ) -> Result<(Tensor, Tensor)> {
        let n = var.elem_count();
        for (what, t) in [("gradient", g), ("first moment", m), ("second moment", v)] {
            if t.elem_count() != n {
                candle_core::bail!(
                    "AdamW: {what} has {} entries, parameter {n}",
                    t.elem_count()
                );
            }
        }
        let mut new_p = vec![0f32; n];
        let mut new_m = vec![0f32; n];
        let mut new_v = vec![0f32; n];
        with_data(var.as_tensor(), |p| {
            with_data(g, |g| {
                with_data(m, |m| {
                    with_data(v, |v| {
                        new_p
                            .par_chunks_mut(CHUNK)
                            .zip(new_m.par_chunks_mut(CHUNK))
                            .zip(new_v.par_chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(i, ((np, nm), nv))| {
                                let o = i * CHUNK;
                                for j in 0..np.len() {
                                    let k = o + j;
                                    (np[j], nm[j], nv[j]) = c.apply(p[k], g[k], m[k], v[k]);
                                }
                            });
                        Ok(())
                    })
                })
            })
        })?;
        let (shape, dev) = (var.shape().clone(), var.device().clone());
        var.set(&Tensor::from_vec(new_p, shape.clone(), &dev)?)?;
        Ok((
            Tensor::from_vec(new_m, shape.clone(), &dev)?,
            Tensor::from_vec(new_v, shape, &dev)?,
        ))
    }

    /// `Σ g²` in f64 for an f32 CPU tensor; `None` for anything else.
    pub(super) fn sq_sum(g: &Tensor) -> Result<Option<f64>> {
        if !g.device().is_cpu() || g.dtype() != DType::F32 {
            return Ok(None);
        }
        with_data(g, |d| {
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
}
