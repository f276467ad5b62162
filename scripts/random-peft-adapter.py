"""Writes a seeded random LoRA adapter in PEFT's layout (adapter_config.json +
adapter_model.safetensors) over an HF llama directory, on q/k/v/o projections, with a non-zero B
so that the adapter changes the model's answers. For check-llamacpp-lora.sh: numerics, not
training. Usage: random-peft-adapter.py BASE_DIR OUT_DIR [R] [STD]"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

base, out = sys.argv[1], sys.argv[2]
r = int(sys.argv[3]) if len(sys.argv) > 3 else 8
std = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
cfg = json.load(open(os.path.join(base, "config.json")))
hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
kv = cfg.get("num_key_value_heads", heads)
head_dim = cfg.get("head_dim", hidden // heads)
outs = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim, "o_proj": hidden}
ins = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim}
g = torch.Generator().manual_seed(7)
tensors = {}
for layer in range(cfg["num_hidden_layers"]):
    for m, n_out in outs.items():
        path = f"base_model.model.model.layers.{layer}.self_attn.{m}"
        tensors[f"{path}.lora_A.weight"] = torch.randn(r, ins[m], generator=g) * std
        tensors[f"{path}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * std
os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
           "lora_dropout": 0.0, "target_modules": list(outs), "bias": "none",
           "base_model_name_or_path": os.path.abspath(base)},
          open(os.path.join(out, "adapter_config.json"), "w"), indent=2)
