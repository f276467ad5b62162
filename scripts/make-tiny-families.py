"""Tiny random checkpoints of every decoder family and RoPE scaling rlhf-bot runs, with
transformers' own outputs beside them: tests/fixtures/families/<name>/.

Each directory holds what `from_pretrained` writes (config.json, model.safetensors,
generation_config.json, tokenizer files) plus:
  expected.safetensors  `logits` [prompt_len, vocab]: transformers' logits of the prompt (f32, eager
                        attention);
  expected.json         the prompt ids, the greedy continuation (16 tokens) and the smallest gap
                        between the best and second-best logit along it (a near-tie would make a
                        greedy comparison meaningless; the script refuses gaps under 1e-3).

The models are hidden 64, 2 layers, vocabulary 320 (a byte-level BPE trained here on the README,
so the fixtures are usable as policies); the original context is 32 positions and the prompt is
40 tokens, so every scaling (and every sliding window of 8) is exercised. Norm weights and biases
get noise so that a port which skipped them would not match. Weights use std 0.1 so the logits
are far from ties.

Run with the bench venv (torch + transformers 5.x):
  ~/.cache/rlhf-bot/bench-venv/bin/python scripts/make-tiny-families.py [OUT_DIR]
Deterministic for a given torch/transformers version (seeded).
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "families")

VOCAB = 320
PROMPT_LEN = 40
NEW_TOKENS = 16
ORIGINAL_CONTEXT = 32
WINDOW = 8

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def llama(rope, max_positions=128, **kw):
    return ("llama", dict(COMMON, max_position_embeddings=max_positions, tie_word_embeddings=True,
                          rope_parameters=rope, **kw))


FIXTURES = {
    # Llama 3.x: the llama3 scaling over an original context of 32.
    "llama3": llama({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT}),
    "llama-linear": llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    # dynamic NTK measures against max_position_embeddings itself.
    "llama-dynamic": llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                           max_positions=ORIGINAL_CONTEXT),
    "llama-yarn": llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": ORIGINAL_CONTEXT}),
    "llama-longrope": llama({"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
                             "long_factor": [1.0, 1.5, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0],
                             "original_max_position_embeddings": ORIGINAL_CONTEXT}),
    # Qwen2.5: q/k/v biases, YaRN, and sliding attention in the layers past max_window_layers.
    "qwen2": ("qwen2", dict(COMMON, max_position_embeddings=128, tie_word_embeddings=True,
                            use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                             "original_max_position_embeddings": ORIGINAL_CONTEXT})),
    # Qwen3: per-head q/k RMSNorm, head_dim (32) not hidden / heads (16).
    "qwen3": ("qwen3", dict(COMMON, max_position_embeddings=128, tie_word_embeddings=True, head_dim=32,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Mistral: untied LM head, sliding window in every layer.
    "mistral": ("mistral", dict(COMMON, max_position_embeddings=128, tie_word_embeddings=False,
                                sliding_window=WINDOW, head_dim=16,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Gemma 2: scaled embedding, sandwich norms, GeGLU, (1 + w) norms, both soft-cappings (small
    # caps so they bite), query_pre_attn_scalar != head_dim, sliding then global layers.
    "gemma2": ("gemma2", dict(COMMON, max_position_embeddings=128, tie_word_embeddings=True, head_dim=16,
                              hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                              attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                              sliding_window=WINDOW,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Gemma 3 (text): q/k norms, local RoPE base on sliding layers, linear scaling on global ones.
    "gemma3": ("gemma3_text", dict(COMMON, max_position_embeddings=128, tie_word_embeddings=True, head_dim=16,
                                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
                                   sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                          "rope_theta": 1000000.0}})),
}


def tiny_tokenizer():
    """A byte-level BPE of VOCAB entries, trained on the README (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read().splitlines()
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(fast) <= VOCAB, len(fast)
    return fast


def perturb(model):
    """Noise on the weights transformers initialises to constants (norms, biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)


def make(name, model_type, kw, tokenizer):
    torch.manual_seed(sum(map(ord, name)))
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    perturb(model)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)

    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, VOCAB, (1, PROMPT_LEN), generator=g)
    # A fresh load, so dynamic/longrope state starts where a user's would.
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(prompt).logits[0]
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    continuation = out.sequences[0, PROMPT_LEN:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    min_gap = min(gaps)
    if min_gap < 1e-3:
        sys.exit(f"{name}: greedy near-tie (gap {min_gap:.2e}); change the seed")
    save_file({"logits": logits.contiguous()}, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"prompt": prompt[0].tolist(), "continuation": continuation, "min_greedy_gap": min_gap,
                   "made_by": "scripts/make-tiny-families.py",
                   "transformers": transformers.__version__, "torch": torch.__version__}, f, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name:15} {model_type:12} {len(continuation)} new tokens, min gap {min_gap:.3f}, {size / 1e3:.0f} kB")


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizer = tiny_tokenizer()
    for name, (model_type, kw) in FIXTURES.items():
        make(name, model_type, kw, tokenizer)


if __name__ == "__main__":
    main()
