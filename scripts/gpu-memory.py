#!/usr/bin/env python3
"""GPU memory of one training step, computed: the table in docs/models.md ("Memory").

One device, no sharding or offload, as rlhf-bot trains. Bytes per parameter:
  trained in full   16 = f32 master weight 4 + f32 gradient 4 + AdamW m and v 8
  frozen            4 (f32) or 2 (bf16, `policy.precision: bf16`)
  LoRA              the base frozen (shared with the reference), adapters 16 per LoRA parameter
Activations kept for backward, bf16 autocast (2 bytes), per token and layer:
  2 * (6h + 3h_kv + 3i + 2*a*s)   (norm outputs, q/k/v and their RoPE'd copies, attention
                                   output, residuals, the gated feed-forward's three [i]
                                   products; scores and probabilities, a*s each, on the
                                   composed CUDA attention path)
Rollouts (PPO, GRPO) add the KV cache: 2 (k, v) * layers * h_kv * 2 bytes per token.
Run: python3 scripts/gpu-memory.py
"""

GB = 1e9

# name: (parameters, hidden, layers, intermediate, heads, kv_heads); Qwen2.5 / SmolLM2 /
# Llama 3 shapes.
MODELS = {
    "0.5B": (0.49e9, 896, 24, 4864, 14, 2),
    "1.7B": (1.71e9, 2048, 24, 8192, 32, 32),
    "7B": (7.6e9, 3584, 28, 18944, 28, 4),
    "14B": (14.8e9, 5120, 48, 13824, 40, 8),
    "32B": (32.8e9, 5120, 64, 27648, 40, 8),
    "70B": (70.6e9, 8192, 80, 28672, 64, 8),
}
GPUS = [("24 GB", 24), ("40/48 GB", 40), ("80 GB H100", 80), ("141 GB H200", 141)]
SEQ = 1024  # tokens per row
TOKENS = 2048  # tokens per micro-batch: one DPO pair of 1024-token rows, or 2 rollouts;
# larger batches come from `grad_accum`, which adds no memory
LORA_FRACTION = 0.01  # r = 16 on every projection: ~1% of the parameters


def activations(h, layers, i, a, kv_h):
    per_token_layer = 2 * (6 * h + 3 * kv_h + 3 * i + 2 * a * SEQ)
    return per_token_layer * layers * TOKENS


def step_bytes(model, algo, lora, frozen_bytes):
    p, h, layers, i, a, kv = MODELS[model]
    kv_h = h // a * kv
    if lora:
        weights = frozen_bytes * p + 16 * LORA_FRACTION * p  # base shared with the reference
    else:
        weights = 16 * p + (frozen_bytes * p if algo != "reward" else 0)  # + frozen reference
    if algo in ("ppo", "grpo"):
        weights += 4 * p  # the reward model (same size, f32 as the scorer loads it)
        weights += 2 * 2 * layers * kv_h * TOKENS  # KV cache of the rollouts
    return weights + activations(h, layers, i, a, kv_h)


def fits(total):
    """GPUs with room for `total` bytes, keeping 8% for the CUDA context and fragmentation."""
    return [name for name, gb in GPUS if total <= gb * GB * 0.92] or ["none"]


def main():
    print(f"tokens per micro-batch {TOKENS} (rows of {SEQ}); GB\n")
    print("| model | algorithm | full f32 | full bf16-frozen | LoRA f32 | LoRA bf16-frozen |")
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        for algo in ("reward", "dpo", "ppo", "grpo"):
            cells = [
                step_bytes(model, algo, lora, fb) for lora in (False, True) for fb in (4, 2)
            ]
            print(f"| {model} | {algo} | " + " | ".join(f"{c / GB:.1f}" for c in cells) + " |")
    print("\nLargest model that fits (bf16-frozen):\n")
    print("| algorithm | " + " | ".join(name for name, _ in GPUS) + " |")
    print("|---" * (len(GPUS) + 1) + "|")
    for algo in ("reward", "dpo", "ppo", "grpo"):
        for lora in (False, True):
            row = []
            for name, _ in GPUS:
                ok = [m for m in MODELS if name in fits(step_bytes(m, algo, lora, 2))]
                row.append(ok[-1] if ok else "none")
            kind = "LoRA" if lora else "full"
            print(f"| {algo}, {kind} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
