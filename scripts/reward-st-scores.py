"""Scores texts with an `export-model --to hf` BERT reward model (sentence-transformers layout) the
way a team outside rlhf-bot would: plain transformers (AutoModel, the pooling that 1_Pooling names,
the 2_Dense weights) and, when installed, sentence-transformers' own `SentenceTransformer.encode`.
Compares both with rlhf-bot's scores (examples/score_reward.rs JSON) and prints the max abs
difference per implementation; exits 1 when one exceeds the tolerance. A text with a tab is a
(prompt, answer) pair. Used by check-reward-export.sh.

usage: reward-st-scores.py EXPORT_DIR OURS.json TOLERANCE TEXT..."""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

export_dir, ours_file, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
texts = sys.argv[4:]
ours = torch.tensor(json.load(open(ours_file))["scores"], dtype=torch.float64)
pairs = [t.split("\t", 1) if "\t" in t else [t] for t in texts]

tok = AutoTokenizer.from_pretrained(export_dir)
encoder = AutoModel.from_pretrained(export_dir, dtype=torch.float32).eval()
pooling = json.load(open(os.path.join(export_dir, "1_Pooling/config.json")))
dense = load_file(os.path.join(export_dir, "2_Dense/model.safetensors"))
rows = []
with torch.no_grad():
    for p in pairs:
        enc = tok(*p, return_tensors="pt")
        h = encoder(**enc).last_hidden_state
        if pooling["pooling_mode_mean_tokens"]:
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:
            pooled = h[:, 0]
        rows.append(pooled @ dense["linear.weight"].float().T + dense["linear.bias"].float())
plain = torch.cat(rows).double()
failed = False
def compare(name, theirs):
    global failed
    d = (theirs - ours).abs().max().item()
    print(f"{name}: max abs difference from rlhf-bot {d:.3g} over {len(texts)} texts x "
          f"{ours.shape[1]} outputs (rewards {[round(x, 4) for x in ours[:, 0].tolist()]})")
    failed |= d > tol
compare("transformers AutoModel + pooling + Dense", plain)
try:
    from sentence_transformers import SentenceTransformer
except ImportError:
    print("sentence-transformers not installed: SentenceTransformer.encode not checked")
else:
    # f32 compute over the stored weights, as rlhf-bot computes (a bf16 export would otherwise
    # also run in bf16 and add its rounding on top of the weights').
    st = SentenceTransformer(export_dir, device="cpu", model_kwargs={"dtype": torch.float32})
    inputs = [tuple(p) if len(p) == 2 else p[0] for p in pairs]
    compare("SentenceTransformer.encode", torch.tensor(st.encode(inputs, batch_size=1)).double())
sys.exit(1 if failed else 0)
