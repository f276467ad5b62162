#!/usr/bin/env python3
"""TRL's RewardTrainer on the recipe `scripts/bench-compare.sh reward-e2e` times for both sides.

all-MiniLM-L6-v2 as a one-label sequence classifier, TRL preference JSONL ({chosen, rejected}
whole dialogues, as HH-RLHF ships them), max length 256, batch 16 pairs, 1 epoch, lr 5e-5, no
evaluation during training; then pairwise accuracy on the held-out file (chosen scores higher).
Prints the training and evaluation seconds and the accuracy.

Run: python3 scripts/bench-trl-reward.py MODEL_DIR TRAIN.jsonl EVAL.jsonl  (env: THREADS)
"""

import json
import os
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    model_dir, train_file, eval_file = sys.argv[1:4]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # TRL appends the EOS token to every non-conversational example; a BERT WordPiece tokenizer
    # has none, so its [SEP] stands in (the row then ends "[SEP] [SEP]", one token longer).
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    train = Dataset.from_list(rows(train_file))
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=16,
            num_train_epochs=1,
            learning_rate=5e-5,
            max_length=256,
            report_to=[],
            save_strategy="no",
            logging_steps=10,
            use_cpu=True,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=train,
                                processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0

    model.eval()
    pairs = rows(eval_file)
    t0 = time.perf_counter()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(pairs), 32):
            batch = pairs[i:i + 32]
            texts = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
            enc = tokenizer(texts, truncation=True, max_length=256, padding=True,
                            return_tensors="pt")
            scores = model(**enc).logits.squeeze(-1)
            n = len(batch)
            correct += int((scores[:n] > scores[n:]).sum())
    eval_s = time.perf_counter() - t0
    print(f"trl reward: train {train_s:.1f} s, eval {eval_s:.1f} s over {len(pairs)} pairs, "
          f"accuracy {correct / len(pairs):.4f}")


if __name__ == "__main__":
    main()
