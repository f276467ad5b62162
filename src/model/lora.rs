//! LoRA adapters for the decoder's linear layers, saved and loaded as PEFT adapters.
//!
//! Fine-tuning every weight of a policy needs optimiser state for every weight; LoRA trains two
//! thin matrices per adapted projection (`W x + (α/r)·B A x`) and leaves the base frozen, which
//! is what makes PPO/DPO on a CI runner affordable. The decoder's projections are
//! [`AdaptableLinear`]s, a plain `Linear` until [`attach_lora`] turns the targeted ones into
//! [`LoraLinear`]s whose A/B live in a caller's `VarMap` (the only thing the optimiser sees)
//! while the base weight is detached. Adapters are written in PEFT's layout
//! (`adapter_config.json` + `adapter_model.safetensors`, names like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) so they load in
//! `peft` too, and can be merged back into full weights for serving.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{Linear, VarMap};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::kernels::{self, matmul_t};

/// File names of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Why a LoRA configuration or adapter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA rank r = 0 adds nothing\nhint: use r >= 1 (8 or 16 are common)")]
    ZeroRank,
    #[error("LoRA dropout {0} is outside [0, 1)")]
    BadDropout(f32),
    #[error(
        "LoRA target_modules is empty\nhint: list module names such as [\"q_proj\", \"v_proj\"]"
    )]
    NoTargets,
    #[error(
        "LoRA target module(s) {missing:?} match no linear layer of the model\nhint: the model's adaptable layers are {available:?}"
    )]
    UnknownTargets {
        missing: Vec<String>,
        available: Vec<String>,
    },
    #[error(
        "PEFT adapter type {0:?} is not supported\nhint: only peft_type \"LORA\" adapters load"
    )]
    NotLora(String),
    #[error("PEFT option {0} is not supported by this LoRA implementation")]
    Unsupported(&'static str),
    #[error("adapter weight {name} is missing from {ADAPTER_WEIGHTS}")]
    MissingWeight { name: String },
    #[error("adapter weight {name} has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// `target_modules` in PEFT is a list of module-name suffixes or a single regex; only the list
/// (and a plain name) is understood here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// The LoRA hyper-parameters, serialised as PEFT's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names to adapt, matched against the last component of each linear layer's
    /// path (`q_proj` adapts every `…self_attn.q_proj`).
    pub target_modules: Vec<String>,
    /// Written as `base_model_name_or_path` for provenance.
    pub base_model: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            base_model: None,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::ZeroRank);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::BadDropout(self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err(LoraError::NoTargets);
        }
        Ok(())
    }

    /// `alpha / r`, the factor PEFT applies to `B A x` (no rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    fn targets(&self, module_path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module_matches(t, module_path))
    }

    /// PEFT's `adapter_config.json` for a causal LM.
    pub fn to_peft_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "base_model_name_or_path": self.base_model,
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing options that would change the maths.
    pub fn from_peft_json(v: &serde_json::Value) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "lora_str")]
            peft_type: String,
            r: usize,
            lora_alpha: f64,
            #[serde(default)]
            lora_dropout: f32,
            target_modules: TargetModules,
            #[serde(default)]
            bias: Option<String>,
            #[serde(default)]
            fan_in_fan_out: bool,
            #[serde(default)]
            use_rslora: bool,
            #[serde(default)]
            use_dora: bool,
            #[serde(default)]
            base_model_name_or_path: Option<String>,
        }
        fn lora_str() -> String {
            "LORA".into()
        }
        let raw: Raw = serde_json::from_value(v.clone()).context("parsing adapter_config.json")?;
        if raw.peft_type != "LORA" {
            return Err(LoraError::NotLora(raw.peft_type).into());
        }
        if raw.use_rslora {
            return Err(LoraError::Unsupported("use_rslora").into());
        }
        if raw.use_dora {
            return Err(LoraError::Unsupported("use_dora").into());
        }
        if raw.fan_in_fan_out {
            return Err(LoraError::Unsupported("fan_in_fan_out").into());
        }
        if raw.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(LoraError::Unsupported("bias other than \"none\"").into());
        }
        let target_modules = match raw.target_modules {
            TargetModules::List(l) => l,
            TargetModules::One(s) if s.chars().all(|c| c.is_alphanumeric() || c == '_') => vec![s],
            TargetModules::One(_) => {
                return Err(LoraError::Unsupported("target_modules given as a regex").into());
            }
        };
        let cfg = Self {
            r: raw.r,
            alpha: raw.lora_alpha,
            dropout: raw.lora_dropout,
            target_modules,
            base_model: raw.base_model_name_or_path,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// PEFT's suffix rule: `target` names the module itself (`q_proj`) or a dotted tail of its path.
fn module_matches(target: &str, module_path: &str) -> bool {
    module_path == target
        || module_path
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// PEFT's tensor name for adapter `part` ("lora_A" or "lora_B") of the linear at `module_path`.
pub fn peft_name(module_path: &str, part: &str) -> String {
    format!("base_model.model.{module_path}.{part}.weight")
}

/// A linear layer with a low-rank update: `y = W x + b + scaling · B (A dropout(x))`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f32,
    training: Arc<AtomicBool>,
}

impl LoraLinear {
    /// `base`'s weight and bias are detached here, so no gradient reaches them whatever
    /// they were built from.
    pub fn new(
        base: &Linear,
        a: Tensor,
        b: Tensor,
        scaling: f64,
        dropout: f32,
        training: Arc<AtomicBool>,
    ) -> Self {
        let base = Linear::new(base.weight().detach(), base.bias().map(Tensor::detach));
        Self {
            base,
            a,
            b,
            scaling,
            dropout,
            training,
        }
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }
    pub fn lora_a(&self) -> &Tensor {
        &self.a
    }
    pub fn lora_b(&self) -> &Tensor {
        &self.b
    }

    /// `W + scaling · B A`, the weight of the equivalent plain layer.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let delta = (self.b.matmul(&self.a)? * self.scaling)?;
        // In the adapter's f32: a base held in bf16 would round the small update away.
        self.base.weight().to_dtype(delta.dtype())?.add(&delta)
    }

    pub fn merge(&self) -> candle_core::Result<Linear> {
        Ok(Linear::new(
            self.merged_weight()?.detach(),
            self.base.bias().cloned(),
        ))
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = dense(&self.base, x)?;
        let x = if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        // Flatten leading dims so both products are plain 2-D matmuls.
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let low = matmul_t(&matmul_t(&x2, &self.a)?, &self.b)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.b.dim(0)?;
        }
        y + (low * self.scaling)?.reshape(out_dims)?
    }
}

/// A decoder projection: plain, or carrying a LoRA adapter.
#[derive(Debug, Clone)]
pub enum AdaptableLinear {
    Plain(Linear),
    Lora(LoraLinear),
}

impl From<Linear> for AdaptableLinear {
    fn from(l: Linear) -> Self {
        Self::Plain(l)
    }
}

impl AdaptableLinear {
    /// The (base) weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        match self {
            Self::Plain(l) => l.weight(),
            Self::Lora(l) => l.base.weight(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Plain(l) => l.bias(),
            Self::Lora(l) => l.base.bias(),
        }
    }

    /// Every tensor the layer multiplies with: weight and bias, plus A and B with an adapter.
    pub fn tensors(&self) -> Vec<Tensor> {
        let base = match self {
            Self::Plain(l) => l,
            Self::Lora(l) => &l.base,
        };
        let mut out: Vec<Tensor> = std::iter::once(base.weight())
            .chain(base.bias())
            .cloned()
            .collect();
        if let Self::Lora(l) = self {
            out.extend([l.a.clone(), l.b.clone()]);
        }
        out
    }

    /// Folds an adapter into the weight; a plain layer stays as it is.
    pub fn merge(&mut self) -> candle_core::Result<()> {
        if let Self::Lora(l) = self {
            *self = Self::Plain(l.merge()?);
        }
        Ok(())
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Plain(l) => dense(l, x),
            Self::Lora(l) => l.forward(x),
        }
    }
}

/// Rows from which [`dense`] uses the fused training matmul (below: decoding shapes).
const FUSED_DENSE_MIN_ROWS: usize = 64;

/// `x·Wᵀ + b` with the leading dimensions of `x` flattened into one matrix product.
/// `candle_nn::Linear` multiplies a `[batch, seq, in]` input batch by batch; during batched
/// generation (`seq` = 1) that is one matrix-vector product per row, each reading the whole
/// weight, where a single `[batch, in]` product reads it once.
fn dense(layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims.last().copied().unwrap_or(1);
    let rows = x.elem_count() / in_dim.max(1);
    let weight = layer.weight();
    let held_in_bf16 = weight.dtype() != x.dtype();
    if !held_in_bf16 && rows >= FUSED_DENSE_MIN_ROWS && kernels::fusable_all(&[x, weight]) {
        // Training and scoring shapes: one op whose backward writes dW in place and skips it
        // for a frozen (LoRA base or reference) weight.
        let y = kernels::matmul_wt(x, weight)?;
        return match layer.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let x2 = x.reshape((rows, in_dim))?;
    // A weight held in bf16, or a frozen weight that candle's matmul backward would give a
    // gradient anyway: the product that gives `x` alone a gradient. Otherwise (decoding shapes,
    // trainable weights off the fused path) the streaming small-m kernel or candle's matmul.
    let y = if held_in_bf16 || (!weight.track_op() && x.track_op()) {
        kernels::frozen_matmul_t(&x2, weight)?
    } else {
        matmul_t(&x2, weight)?
    };
    let y = match layer.bias() {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = weight.dim(0)?;
    }
    y.reshape(out_dims)
}

/// A model whose linear layers can carry adapters. `linears_mut` lists every adaptable layer
/// with its HF module path (`model.layers.0.self_attn.q_proj`).
pub trait HasAdaptableLinears {
    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)>;
}

/// The adapters attached to one model: which layers, with what config, and the switch that
/// turns LoRA dropout on during training.
#[derive(Debug, Clone)]
pub struct LoraAdapters {
    pub config: LoraConfig,
    /// Module paths that carry an adapter, in model order.
    pub modules: Vec<String>,
    training: Arc<AtomicBool>,
}

impl LoraAdapters {
    /// Dropout is applied only while training is on (off by default, e.g. for generation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (the `varmap` passed to
    /// [`attach_lora`], whose names already are PEFT's) into `dir`.
    pub fn save_peft(&self, dir: &Path, varmap: &VarMap) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        std::fs::write(
            &cfg_path,
            serde_json::to_string_pretty(&self.config.to_peft_json())?,
        )
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for m in &self.modules {
            for part in ["lora_A", "lora_B"] {
                let name = peft_name(m, part);
                let v = data
                    .get(&name)
                    .ok_or_else(|| LoraError::MissingWeight { name: name.clone() })?;
                tensors.insert(name, v.as_tensor().detach());
            }
        }
        let w = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &w)
            .with_context(|| format!("cannot write {}", w.display()))
    }
}

/// Where an adapter's initial A/B come from.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// Fresh adapter: A ~ U(−1/√in, 1/√in) (PEFT's `kaiming_uniform_(a=√5)`) from a ChaCha
    /// stream seeded with this value, B = 0, so the model starts exactly at the base.
    Fresh { seed: u64 },
    /// Saved adapter tensors under PEFT names (from [`load_peft`]).
    Weights(HashMap<String, Tensor>),
}

/// Wraps every targeted linear of `model` in a [`LoraLinear`] whose A and B are new variables
/// of `varmap` (named as PEFT names them). Nothing else enters `varmap`: the base stays frozen.
pub fn attach_lora<M: HasAdaptableLinears + ?Sized>(
    model: &mut M,
    config: &LoraConfig,
    varmap: &VarMap,
    init: LoraInit,
) -> Result<LoraAdapters> {
    config.validate()?;
    let training = Arc::new(AtomicBool::new(false));
    let mut rng = match &init {
        LoraInit::Fresh { seed } => Some(ChaCha8Rng::seed_from_u64(*seed)),
        LoraInit::Weights(_) => None,
    };
    let mut linears = model.linears_mut();
    let available: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let mut modules = Vec::new();
    let mut matched = vec![false; config.target_modules.len()];
    for (path, lin) in linears.iter_mut() {
        if !config.targets(path) {
            continue;
        }
        for (i, t) in config.target_modules.iter().enumerate() {
            matched[i] |= module_matches(t, path);
        }
        let base = match &**lin {
            AdaptableLinear::Plain(l) => l.clone(),
            AdaptableLinear::Lora(_) => anyhow::bail!("{path} already carries a LoRA adapter"),
        };
        let (out_dim, in_dim) = base.weight().dims2()?;
        let dev = base.weight().device().clone();
        // Trainable A/B (and their optimiser state) stay f32 when the base is held in bf16.
        let dtype = match base.weight().dtype() {
            DType::BF16 | DType::F16 => DType::F32,
            d => d,
        };
        let (a, b) = match (&init, rng.as_mut()) {
            (LoraInit::Fresh { .. }, Some(rng)) => {
                let bound = 1.0 / (in_dim as f64).sqrt();
                let vals: Vec<f32> = (0..config.r * in_dim)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(vals, (config.r, in_dim), &dev)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out_dim, config.r), dtype, &dev)?;
                (a, b)
            }
            (LoraInit::Weights(w), _) => {
                let get = |part: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let name = peft_name(path, part);
                    let t = w
                        .get(&name)
                        .ok_or_else(|| LoraError::MissingWeight { name: name.clone() })?;
                    if t.dims() != shape {
                        return Err(LoraError::BadShape {
                            name,
                            found: t.dims().to_vec(),
                            expected: shape.to_vec(),
                        }
                        .into());
                    }
                    Ok(t.to_device(&dev)?.to_dtype(dtype)?)
                };
                (
                    get("lora_A", [config.r, in_dim])?,
                    get("lora_B", [out_dim, config.r])?,
                )
            }
            (LoraInit::Fresh { .. }, None) => unreachable!("a fresh init always has an rng"),
        };
        let a = insert_var(varmap, &peft_name(path, "lora_A"), a)?;
        let b = insert_var(varmap, &peft_name(path, "lora_B"), b)?;
        **lin = AdaptableLinear::Lora(LoraLinear::new(
            &base,
            a,
            b,
            config.scaling(),
            config.dropout,
            training.clone(),
        ));
        modules.push(path.clone());
    }
    let missing: Vec<String> = config
        .target_modules
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(t, _)| t.clone())
        .collect();
    if !missing.is_empty() {
        return Err(LoraError::UnknownTargets { missing, available }.into());
    }
    Ok(LoraAdapters {
        config: config.clone(),
        modules,
        training,
    })
}

fn insert_var(varmap: &VarMap, name: &str, init: Tensor) -> Result<Tensor> {
    let var = Var::from_tensor(&init)?;
    let t = var.as_tensor().clone();
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    if data.contains_key(name) {
        anyhow::bail!(
            "{name} is already a variable of this VarMap\nhint: attach LoRA once per model"
        );
    }
    data.insert(name.to_owned(), var);
    Ok(t)
}

/// Reads a PEFT adapter directory: its config and its tensors (f32, CPU).
pub fn load_peft(dir: &Path) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "cannot read {}\nhint: a LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
            cfg_path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    let cfg =
        LoraConfig::from_peft_json(&v).with_context(|| format!("in {}", cfg_path.display()))?;
    let w = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&w, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read {}", w.display()))?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    Ok((cfg, tensors))
}

/// The module paths a PEFT adapter's tensors adapt (`model.layers.0.self_attn.q_proj`), sorted.
pub fn adapted_modules(adapter: &HashMap<String, Tensor>) -> Vec<String> {
    let mut modules: Vec<String> = adapter
        .keys()
        .filter_map(|k| {
            k.strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")
                .map(str::to_owned)
        })
        .collect();
    modules.sort();
    modules
}

/// Merges an adapter into a full HF state dict (`module_path.weight` names), in place:
/// `W += scaling · B A` for every adapted module. For exporting a merged checkpoint without
/// building the model.
pub fn merge_into_state_dict(
    weights: &mut HashMap<String, Tensor>,
    config: &LoraConfig,
    adapter: &HashMap<String, Tensor>,
) -> Result<Vec<String>> {
    let mut merged = Vec::new();
    for m in adapted_modules(adapter) {
        let wname = format!("{m}.weight");
        let w = weights
            .get(&wname)
            .with_context(|| format!("adapter module {m} has no base weight {wname}"))?;
        let a = &adapter[&peft_name(&m, "lora_A")];
        let b = adapter
            .get(&peft_name(&m, "lora_B"))
            .ok_or_else(|| LoraError::MissingWeight {
                name: peft_name(&m, "lora_B"),
            })?;
        let delta = (b.matmul(a)? * config.scaling())?.to_dtype(w.dtype())?;
        let new = w.add(&delta.to_device(w.device())?)?;
        weights.insert(wname, new);
        merged.push(m);
    }
    Ok(merged)
}

/// Folds every adapter of `model` into its base weights (for serving or export).
pub fn merge_all<M: HasAdaptableLinears + ?Sized>(model: &mut M) -> Result<usize> {
    let mut n = 0;
    for (_, lin) in model.linears_mut() {
        if matches!(lin, AdaptableLinear::Lora(_)) {
            lin.merge()?;
            n += 1;
        }
    }
    Ok(n)
}
