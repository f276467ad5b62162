#!/usr/bin/env python3
"""PyTorch baselines for the step benchmarks in docs/benchmarks.md, on the same machine.

The issues quote PyTorch timings taken on another machine (AVX-512); this script measures the
same shapes here so the Rust benches are compared with PyTorch on identical hardware. It is not
part of the test suite and needs PyTorch installed by hand (`pip install torch`).

Cases (all f32, `torch.set_num_threads(THREADS)`, default 2; on DEVICE, default cpu: with
DEVICE=cuda every tensor and module is created on the GPU and each timed step ends with
`torch.cuda.synchronize()`, as the Rust benches synchronise before stopping their clocks):
  gemm  -- GFLOP/s of the projection matmuls the steps are made of;
  bert  -- MiniLM-size reward step (6 layers, d 384, ffn 1536, 12 heads, vocab 30522,
           batch 16 x 128, mean pooling + score head, Bradley-Terry on 8 pairs, SDPA attention,
           fused AdamW, no dropout): what `cargo bench --bench bert_step` runs;
  bert-bf16 -- the same step under `torch.autocast("cpu", dtype=torch.bfloat16)`: the matmuls
           take bf16 inputs with f32 accumulation (oneDNN), weights and AdamW stay f32; what
           `BENCH_PRECISION=bf16 cargo bench --bench bert_step` runs;
  dpo   -- DPO step on the tiny Llama (4 layers, hidden 256, ffn 768, 4 heads / 2 KV heads,
           vocab 49152, tied embeddings), 8 chosen + 8 rejected x 256 tokens, the last 128 the
           completion: reference forward without grad, policy forward, backward, AdamW, as TRL
           does it (full logits, log-softmax, gather): what `cargo bench --bench dpo_step` runs;
  generate -- greedy generation with transformers' KV cache, 64 new tokens, batch 1 and 8, from
           the eight chat prompts of benches/generate.rs: needs `pip install transformers` and
           MODEL_DIR, an HF directory of SmolLM2-135M-Instruct in f32 (the `*-base/` directory
           that `train policy` converts from the GGUF, e.g. under scripts/demo-smollm2.sh's output).

Run: python3 scripts/bench-pytorch.py [gemm] [bert] [bert-bf16] [dpo] [generate]
     (env: THREADS, STEPS, WARMUP, MODEL_DIR, DEVICE)
"""

import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

THREADS = int(os.environ.get("THREADS", "2"))
STEPS = int(os.environ.get("STEPS", "5"))
WARMUP = int(os.environ.get("WARMUP", "2"))
DEVICE = os.environ.get("DEVICE", "cpu")


def sync():
    """Waits for the GPU's queued kernels, so a step's time includes them."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, steps=STEPS, warmup=WARMUP):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def bench_gemm():
    for m, k, n in [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 256, 49152)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        med, best = timed(lambda: a @ b, steps=10, warmup=3)
        print(f"gemm {m}x{k}x{n}: {2 * m * k * n / best / 1e9:.1f} GFLOP/s (best), "
              f"{2 * m * k * n / med / 1e9:.1f} (median)")


class BertLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                             attn_mask=mask)
        x = self.ln1(x + self.o(att.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class BertReward(nn.Module):
    def __init__(self, vocab=30522, d=384, layers=6, heads=12, ffn=1536, max_pos=512):
        super().__init__()
        self.tok, self.pos, self.typ = nn.Embedding(vocab, d), nn.Embedding(max_pos, d), nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))
        self.score = nn.Linear(d, 1)

    def forward(self, ids, attn):
        t = ids.shape[1]
        x = self.ln(self.tok(ids) + self.pos(torch.arange(t))[None] + self.typ(torch.zeros_like(ids)))
        mask = attn[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        pooled = (x * attn[..., None]).sum(1) / attn.sum(1, keepdim=True)
        return self.score(pooled).squeeze(-1)


def bench_bert(autocast=False):
    torch.manual_seed(0)
    model = BertReward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(1000, 30000, (16, 128))
    attn = torch.ones(16, 128)

    def step():
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
            r = model(ids, attn)
            loss = -F.logsigmoid(r[:8].float() - r[8:].float()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    med, best = timed(step)
    label = "bert bf16-autocast step" if autocast else "bert step"
    print(f"{label} (16x128): median {med:.3f} s, best {best:.3f} s, {16 * 128 / med:.0f} tokens/s")


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaLayer(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab=49152, d=256, layers=4, heads=4, kv_heads=2, ffn=768, theta=10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        hd = d // heads
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(4096).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.embed(ids)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T  # tied LM head


def sequence_logps(model, ids, completion_mask):
    logits = model(ids)[:, :-1]
    labels = ids[:, 1:]
    per_token = torch.gather(logits.log_softmax(-1), 2, labels[..., None]).squeeze(-1)
    return (per_token * completion_mask[:, 1:]).sum(-1)


def bench_dpo():
    torch.manual_seed(0)
    policy, reference = TinyLlama(), TinyLlama()
    reference.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    ids = torch.randint(0, 49152, (16, 256))
    completion = torch.zeros(16, 256)
    completion[:, 128:] = 1.0
    beta = 0.1

    def step():
        with torch.no_grad():
            ref = sequence_logps(reference, ids, completion)
        pol = sequence_logps(policy, ids, completion)
        logits = beta * ((pol[:8] - ref[:8]) - (pol[8:] - ref[8:]))
        loss = -F.logsigmoid(logits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    med, best = timed(step, steps=min(STEPS, 3), warmup=1)
    print(f"dpo step (8+8 x 256): median {med:.2f} s, best {best:.2f} s")


# The prompts of `cargo bench --bench generate` / `ppo_step`: one question per line.
QUESTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches",
                              "common", "questions.txt")
with open(QUESTIONS_FILE, encoding="utf-8") as f:
    QUESTIONS = [line.strip() for line in f if line.strip()]


def bench_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = os.environ["MODEL_DIR"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    new_tokens = 64
    for batch in (1, 8):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True)
            for q in QUESTIONS[:batch]
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(DEVICE)

        def run():
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)

        med, best = timed(run, steps=min(STEPS, 3), warmup=1)
        print(f"generate batch {batch}: {batch * new_tokens / med:.1f} tokens/s (median), "
              f"{batch * new_tokens / best:.1f} (best)")


def main():
    torch.set_num_threads(THREADS)
    # Every tensor and module the cases create lands on DEVICE.
    torch.set_default_device(DEVICE)
    gpu = f", {torch.cuda.get_device_name()}" if DEVICE.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, device {DEVICE}{gpu}")
    cases = sys.argv[1:] or ["gemm", "bert", "dpo", "generate"]
    for case in cases:
        cases_by_name = {"gemm": bench_gemm, "bert": bench_bert,
                         "bert-bf16": lambda: bench_bert(autocast=True), "dpo": bench_dpo,
                         "generate": bench_generate}
        cases_by_name[case]()


if __name__ == "__main__":
    main()
