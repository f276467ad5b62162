#!/usr/bin/env python3
"""Tokenizes strings with llama.cpp itself (llama-cpp-python, vocabulary only) from a GGUF file,
and prints one JSON list: for each string, its ids without and with BOS (special tokens parsed).

tests/it/gguf_spm.rs runs it on our GGUF exports when the bench venv has llama-cpp-python, and
scripts/make-spm-tokenizers.py on the fixtures, so "the ids llama.cpp gives" are llama.cpp's.
Usage: llamacpp-tokenize.py FILE.gguf STRINGS.json   (STRINGS.json: a JSON list of strings)
"""
import json
import sys

from llama_cpp import Llama


def tokenize(gguf_path: str, texts: list) -> list:
    model = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    return [
        {
            "text": t,
            "ids": model.tokenize(t.encode("utf-8"), add_bos=False, special=True),
            "with_bos": model.tokenize(t.encode("utf-8"), add_bos=True, special=True),
        }
        for t in texts
    ]


if __name__ == "__main__":
    with open(sys.argv[2], encoding="utf-8") as f:
        strings = json.load(f)
    print(json.dumps(tokenize(sys.argv[1], strings), ensure_ascii=False))
