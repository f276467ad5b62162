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

use crate::kernels::adamw;

pub use crate::kernels::adamw::AdamWConfig;

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    moments: Moments,
}

/// A parameter's first and second moments.
#[derive(Debug)]
enum Moments {
    /// For an f32 parameter on the CPU: plain buffers the fused kernel updates in place, in the
    /// same pass as the parameter.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Anywhere else: tensors the composed update replaces each step.
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(var: &Var) -> CResult<Self> {
        Self::from_tensors(
            Tensor::zeros(var.shape(), var.dtype(), var.device())?,
            Tensor::zeros(var.shape(), var.dtype(), var.device())?,
            var,
        )
    }

    /// Moments of `var` from tensors of its shape and dtype, held the way [`adamw`] updates
    /// them on `var`'s device.
    fn from_tensors(m: Tensor, v: Tensor, var: &Var) -> CResult<Self> {
        if var.device().is_cpu() && var.dtype() == DType::F32 {
            Ok(Self::Host {
                m: m.flatten_all()?.to_vec1()?,
                v: v.flatten_all()?.to_vec1()?,
            })
        } else {
            Ok(Self::Device { m, v })
        }
    }

    fn to_tensors(&self, var: &Var) -> CResult<(Tensor, Tensor)> {
        match self {
            Self::Host { m, v } => Ok((
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            )),
            Self::Device { m, v } => Ok((m.clone(), v.clone())),
        }
    }
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
            let moments = Moments::zeros(&var)?;
            slots.push(Slot { name, var, moments });
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
            let (m, v) = match &mut s.moments {
                Moments::Host { m, v } if adamw::applies(&s.var, g) => {
                    let c = adamw::Consts::new(&self.cfg, scale_m, scale_v, grad_scale);
                    adamw::update_in_place(&s.var, g, (m, v), &c)?;
                    continue;
                }
                Moments::Host { .. } => candle_core::bail!(
                    "AdamW: the gradient of {} is not f32 on the CPU as its parameter is",
                    s.name
                ),
                Moments::Device { m, v } => (m, v),
            };
            let scaled;
            let g = match grad_scale {
                Some(c) => {
                    scaled = g.affine(c, 0.0)?;
                    &scaled
                }
                None => g,
            };
            // Same op order as candle_nn::AdamW, so the two agree bit for bit.
            let next_m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (s.var.as_tensor() * (1f64 - lr * weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            *m = next_m;
            *v = next_v;
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
            let (m, v) = s.moments.to_tensors(&s.var)?;
            map.insert(format!("m.{}", s.name), m);
            map.insert(format!("v.{}", s.name), v);
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
            s.moments = Moments::from_tensors(m, v, &s.var)?;
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
    if let Some(s) = adamw::sq_sum(g)? {
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
