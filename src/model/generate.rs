//! Batched autoregressive generation with a KV cache: what PPO rollouts, evaluation and the
//! demo CLI call to get answers from a policy.
//!
//! Prompts of different lengths are LEFT-padded so that every row's next token is predicted
//! at the same (last) column, as transformers does for decoder-only models; the decoder turns
//! the attention mask into per-row positions and masks the pad keys. The prompt is run once,
//! the keys/values of every layer are kept, and each later step feeds only the new token. Each
//! row stops at a stop token (the config's EOS ids) or after `max_new_tokens`. Besides the
//! token ids and texts, every sampled token's log-probability is returned, because PPO needs
//! the behaviour policy's log-probs of exactly the tokens it generated.

use anyhow::{Context, Result};
use candle_core::{D, Device, IndexOp, Tensor};

use crate::kernels;
use crate::model::llama::{LayerKv, LlamaForCausalLM};
use crate::model::sampling::{Sampler, SamplingParams, token_logprob};

/// Per-layer key/value buffers, filled by the decoder.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |kv| kv.len())
    }
}

/// A causal LM that generation can drive.
pub trait CausalLm {
    fn num_layers(&self) -> usize;
    fn device(&self) -> &Device;

    /// Logits `[batch, vocab]` of the LAST column for `input_ids` `[batch, t]` following the
    /// `cache.seq_len()` cached positions; `mask` rows span `cache.seq_len() + t` columns
    /// (1 = token, 0 = padding). Appends the new keys/values to `cache`.
    fn last_logits_cached(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor>;

    /// Logits `[batch, vocab]` of the last column, recomputed from the whole sequence (no
    /// cache). The reference the cached path is tested against.
    fn last_logits_full(&self, input_ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor>;
}

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// A row stops once it produces one of these (typically the config's `eos_token_id`s).
    pub stop_token_ids: Vec<u32>,
    /// Fills prompts on the left and finished rows afterwards.
    pub pad_token_id: u32,
    /// Use the KV cache (the default); off only to check the cache against recomputation.
    #[serde(default = "yes")]
    pub use_cache: bool,
}

fn yes() -> bool {
    true
}

impl GenerationConfig {
    /// Greedy decoding up to `max_new_tokens`, stopping at `eos` ids.
    pub fn greedy(max_new_tokens: usize, stop_token_ids: Vec<u32>, pad_token_id: u32) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_token_ids,
            pad_token_id,
            use_cache: true,
        }
    }
}

/// Generated continuations, one entry per prompt, in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids, the stop token included when one was produced; no padding.
    pub tokens: Vec<Vec<u32>>,
    /// `log p(token | prefix)` of each generated token under the distribution it was drawn
    /// from: softmax(logits / T) for temperature T > 0, softmax(logits) for greedy (T = 0).
    /// TRL's PPO records rollout log-probs the same way.
    pub logprobs: Vec<Vec<f32>>,
    /// Whether the row ended with a stop token (false: cut at `max_new_tokens`).
    pub finished: Vec<bool>,
    /// Prompt lengths (unpadded).
    pub prompt_lens: Vec<usize>,
}

impl Generation {
    /// Total tokens generated (for throughput numbers).
    pub fn num_tokens(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }

    /// Decodes every row. With `skip_special_tokens` the stop token is left out of the text.
    pub fn texts(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        self.tokens
            .iter()
            .map(|ids| {
                tokenizer
                    .decode(ids, skip_special_tokens)
                    .map_err(|e| anyhow::anyhow!("decoding generated tokens: {e}"))
            })
            .collect()
    }
}

/// Generates continuations of the token-id `prompts` (each non-empty).
///
/// The decoding loop runs on a rayon worker ([`kernels::on_worker`]): each token's forward pass is
/// hundreds of small parallel products, and handing each one over from an outside thread costs
/// more than the product itself for the smaller layers.
pub fn generate<M: CausalLm + Sync + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Generation> {
    kernels::on_worker(|| generate_here(model, prompts, cfg))
}

fn generate_here<M: CausalLm + Sync + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Generation> {
    if prompts.is_empty() {
        return Ok(Generation {
            tokens: vec![],
            logprobs: vec![],
            finished: vec![],
            prompt_lens: vec![],
        });
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        anyhow::bail!("prompt {i} is empty\nhint: a prompt needs at least one token (e.g. BOS)");
    }
    let mut sampler = Sampler::new(cfg.sampling, cfg.seed)?;
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Left padding: row i = [pad; width - len_i] ++ prompt_i.
    let mut ids: Vec<Vec<u32>> = Vec::with_capacity(b);
    let mut mask: Vec<Vec<u32>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = width - p.len();
        let mut row = vec![cfg.pad_token_id; pad];
        row.extend_from_slice(p);
        ids.push(row);
        let mut m = vec![0u32; pad];
        m.extend(std::iter::repeat_n(1u32, p.len()));
        mask.push(m);
    }
    let device = model.device().clone();
    let temperature = if cfg.sampling.is_greedy() {
        1.0
    } else {
        cfg.sampling.temperature
    };
    let mut out = Generation {
        tokens: vec![Vec::new(); b],
        logprobs: vec![Vec::new(); b],
        finished: vec![false; b],
        prompt_lens: prompts.iter().map(Vec::len).collect(),
    };
    let mut cache = KvCache::new(model.num_layers());
    let mut step_input = rows_tensor(&ids, &device)?;
    for step in 0..cfg.max_new_tokens {
        let logits = if cfg.use_cache {
            model.last_logits_cached(&step_input, &mask, &mut cache)
        } else {
            model.last_logits_full(&rows_tensor(&ids, &device)?, &mask)
        }
        .with_context(|| format!("forward pass at generation step {step}"))?;
        let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (i, row) in logits.iter().enumerate() {
            if out.finished[i] {
                next.push(cfg.pad_token_id);
                continue;
            }
            let tok = sampler
                .sample(row)
                .with_context(|| format!("sampling row {i} at step {step}"))?;
            let lp = if temperature == 1.0 {
                token_logprob(row, tok)
            } else {
                let scaled: Vec<f32> = row.iter().map(|v| v / temperature).collect();
                token_logprob(&scaled, tok)
            }
            .unwrap_or(f64::NEG_INFINITY);
            out.tokens[i].push(tok);
            out.logprobs[i].push(lp as f32);
            if cfg.stop_token_ids.contains(&tok) {
                out.finished[i] = true;
            }
            next.push(tok);
        }
        if out.finished.iter().all(|f| *f) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Finished rows keep feeding padding (their outputs are ignored); the mask column
        // stays 1 so every row's positions advance alike, as in transformers.
        for (i, t) in next.iter().enumerate() {
            ids[i].push(*t);
            mask[i].push(1);
        }
        step_input = Tensor::from_vec(next, (b, 1), &device)?;
    }
    Ok(out)
}

/// Generation from text prompts: the ids and log-probs plus the decoded answers.
#[derive(Debug, Clone, PartialEq)]
pub struct TextGeneration {
    pub generation: Generation,
    /// Each answer decoded without special tokens (the stop token is not in the text).
    pub texts: Vec<String>,
}

/// Encodes already-rendered prompt `texts` with `tokenizer` (no special tokens added: a
/// rendered chat template already contains them), generates, and decodes the answers.
pub fn generate_from_texts<M: CausalLm + Sync + ?Sized>(
    model: &M,
    tokenizer: &tokenizers::Tokenizer,
    texts: &[String],
    cfg: &GenerationConfig,
) -> Result<TextGeneration> {
    let prompts = texts
        .iter()
        .map(|t| {
            tokenizer
                .encode(t.as_str(), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("tokenising prompt {t:?}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let generation = generate(model, &prompts, cfg)?;
    let texts = generation.texts(tokenizer, true)?;
    Ok(TextGeneration { generation, texts })
}

fn rows_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

/// The logits of the last column of hidden states `[batch, t, hidden]`: only one position per
/// row goes through the (large) vocabulary projection.
pub fn last_position_logits(model: &LlamaForCausalLM, hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    let last = hidden.i((.., t - 1, ..))?.contiguous()?;
    Ok(model.head_logits(&last)?)
}

/// `log_softmax` over the last dimension, for callers that score whole sequences.
pub fn log_softmax_last(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

impl CausalLm for LlamaForCausalLM {
    fn num_layers(&self) -> usize {
        self.config().num_hidden_layers
    }

    fn device(&self) -> &Device {
        self.lm_head_weight().device()
    }

    fn last_logits_cached(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hidden = self
            .model()
            .forward_cached(input_ids, mask, &mut cache.layers)?;
        last_position_logits(self, &hidden)
    }

    fn last_logits_full(&self, input_ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let b = mask.len();
        let t = mask.first().map_or(0, Vec::len);
        let flat: Vec<u32> = mask.iter().flatten().copied().collect();
        let mask = Tensor::from_vec(flat, (b, t), input_ids.device())?;
        let hidden = self.model().forward(input_ids, Some(&mask))?;
        last_position_logits(self, &hidden)
    }
}
