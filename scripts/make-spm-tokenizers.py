"""Two real SentencePiece tokenizers and what the reference implementations make of them:
tests/fixtures/spm/<style>/, for the GGUF tokenizer tests (tests/it/gguf_spm.rs).

No SentencePiece model small and free enough ships in a package, so one is trained here with the
`sentencepiece` library on a snapshot of the repository's own docs (corpus.txt), in two styles:
  llama  Llama 2 / Mistral v0.1: BPE, byte fallback, digits split, a dummy "▁" prefix on every
         text (<unk> 0, <s> 1, </s> 2);
  gemma  Gemma: the same without the dummy prefix, <pad> 0, <eos> 1, <bos> 2, <unk> 3, and the
         chat turn markers as pieces of their own.
Each directory holds:
  tokenizer.model        the SentencePiece model;
  tokenizer.json,
  tokenizer_config.json  transformers' conversion of it (`save_pretrained`);
  vocab.gguf             a vocabulary-only GGUF written by llama.cpp's own Python writer (PyPI
                         `gguf`), its vocabulary read from tokenizer.model the way llama.cpp's
                         convert_hf_to_gguf.py does for SentencePiece (tokens, scores, types, special
                         ids, add_bos/add_eos, add_space_prefix);
  expected.json          tricky strings with the ids llama.cpp's SPM tokenizer produces: the text is
                         cut at the special tokens and each piece between them is encoded by
                         SentencePiece itself (which adds the dummy prefix to each, as llama.cpp
                         does), checked against llama.cpp itself when llama-cpp-python is installed
                         (scripts/llamacpp-tokenize.py), plus the ids transformers gives and whether
                         the two agree.

Run with the bench venv (transformers 5.x; scripts/lib/bench-venv.sh) plus the pinned
sentencepiece, protobuf and llama.cpp's gguf package, and optionally llama-cpp-python:
  ~/.cache/rlhf-bot/bench-venv/bin/pip install sentencepiece==0.2.3 protobuf==7.36.2 gguf==0.19.0
  ~/.cache/rlhf-bot/bench-venv/bin/python scripts/make-spm-tokenizers.py [OUT_DIR]
The tests need none of these: they read the committed files.
Deterministic (single-threaded training on fixed text).
"""
import glob
import json
import os
import pathlib
import re
import sys
import tempfile

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from gguf.vocab import SentencePieceVocab, SpecialVocab
from transformers import GemmaTokenizer, LlamaTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "spm")
VOCAB = 1000

TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]

# Each one exercises something an SPM port gets wrong: the dummy prefix, runs of spaces (kept,
# not collapsed), characters outside the vocabulary (byte fallback, including 4-byte emoji),
# newlines and tabs, digits, and special tokens inside the text.
STRINGS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "multiple    spaces  inside",
    "trailing space ",
    "line one\nline two\n\nafter a blank line",
    "\ttab\tseparated",
    "numbers 12345 and 3.14",
    "café, naïve, Zürich",
    "emoji 🤗 and 🦀 need byte fallback",
    "日本語のテキスト",
    "",
    " ",
    "<s>inside</s> text",
    "<start_of_turn>user\nHow do I train?<end_of_turn>\n<start_of_turn>model\n",
    "reward model training feedback",
]


def corpus() -> str:
    """The training text: tests/fixtures/spm/corpus.txt, made once from the repository's docs (the
    first 64 KiB; no emoji or CJK, which must fall back to bytes) and kept, so that reruns train
    the same model while the docs change."""
    path = os.path.join(OUT, "corpus.txt")
    if not os.path.exists(path):
        parts = []
        for doc in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]:
            with open(doc, encoding="utf-8") as f:
                parts.append(f.read())
        text = "".join(c for c in "\n".join(parts) if ord(c) < 0x2000)[: 64 * 1024]
        os.makedirs(OUT, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(path, encoding="utf-8") as f:
        return f.read()


def train(style: str, workdir: str) -> str:
    text_path = os.path.join(workdir, "corpus.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(corpus())
    prefix = os.path.join(workdir, style)
    common = dict(
        input=text_path,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    if style == "llama":
        spm.SentencePieceTrainer.train(
            **common, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1
        )
    else:
        spm.SentencePieceTrainer.train(
            **common,
            add_dummy_prefix=False,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            bos_piece="<bos>",
            eos_piece="<eos>",
            user_defined_symbols=TURN_MARKERS,
        )
    # The model records the temporary paths it was trained from: drop them so reruns are identical.
    proto = sentencepiece_model_pb2.ModelProto()
    with open(prefix + ".model", "rb") as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    with open(prefix + ".model", "wb") as f:
        f.write(proto.SerializeToString())
    return prefix + ".model"


def hf_tokenizer(style: str, model_path: str, out: str):
    if style == "llama":
        tok = LlamaTokenizer.from_pretrained(
            os.path.dirname(model_path), vocab_file=model_path, legacy=True, add_bos_token=True
        )
    else:
        tok = GemmaTokenizer.from_pretrained(
            os.path.dirname(model_path),
            vocab_file=model_path,
            add_bos_token=True,
            additional_special_tokens=TURN_MARKERS,
            mask_token=None,
        )
    tok.save_pretrained(out)
    # save_pretrained records where the .model came from (this machine's path): drop it.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("vocab_file", None)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return tok


def write_gguf(style: str, out: str) -> None:
    """The vocabulary as convert_hf_to_gguf.py writes an SPM model's (`_create_vocab_sentencepiece`):
    SentencePiece's pieces, scores and types; pieces transformers marks special become CONTROL,
    other added pieces USER_DEFINED."""
    vocab = SentencePieceVocab(pathlib.Path(out))
    # The converter reads tokenizer_config.json's added_tokens_decoder, which transformers 4 wrote
    # from the same entries as tokenizer.json's added_tokens (transformers 5 writes only the latter).
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        added = {t["id"]: t for t in json.load(f)["added_tokens"]}
    tokens, scores, types = [], [], []
    for text, score, ty in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ty)
    for tid, info in added.items():
        if types[tid] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            types[tid] = gguf.TokenType.CONTROL if info.get("special") else gguf.TokenType.USER_DEFINED
    arch = "llama" if style == "llama" else "gemma2"
    w = gguf.GGUFWriter(os.path.join(out, "vocab.gguf"), arch)
    w.add_name(f"spm-{style}-vocab")
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    proto = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    sp_model = sentencepiece_model_pb2.ModelProto()
    sp_model.ParseFromString(proto.serialized_model_proto())
    w.add_add_space_prefix(sp_model.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(sp_model.normalizer_spec.remove_extra_whitespaces)
    SpecialVocab(out, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_ids(sp, specials: dict, text: str, add_bos: bool, bos: int) -> list:
    """llama.cpp's SPM tokenisation: special tokens matched in the raw text, every stretch between
    them encoded on its own (SentencePiece adds its dummy prefix to each, as llama.cpp does after
    a special token)."""
    ids = [bos] if add_bos else []
    if not specials:
        return ids + (sp.encode(text) if text else [])
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


def check_with_llama_cpp(gguf_path: str, cases: list) -> None:
    """llama.cpp itself (llama-cpp-python, when installed) must give the recorded ids."""
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("lct", os.path.join(HERE, "llamacpp-tokenize.py"))
        lct = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lct)
    except ImportError:
        print("llama-cpp-python not installed: the ids are not checked against llama.cpp", file=sys.stderr)
        return
    got = lct.tokenize(gguf_path, [c["text"] for c in cases])
    for g, c in zip(got, cases):
        if g["ids"] != c["ids"] or g["with_bos"] != c["with_bos"]:
            sys.exit(f"llama.cpp tokenizes {c['text']!r} as {g}, not {c['ids']}")


def main() -> None:
    for style in ["llama", "gemma"]:
        out = os.path.join(OUT, style)
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            trained = train(style, tmp)
            # transformers converts from a directory holding nothing but tokenizer.model (a
            # tokenizer.json beside it would be loaded instead).
            model_dir = os.path.join(tmp, "hf")
            os.makedirs(model_dir)
            for dest in [model_dir, out]:
                with open(trained, "rb") as src, open(os.path.join(dest, "tokenizer.model"), "wb") as dst:
                    dst.write(src.read())
            tok = hf_tokenizer(style, os.path.join(model_dir, "tokenizer.model"), out)
        model = os.path.join(out, "tokenizer.model")
        write_gguf(style, out)
        sp = spm.SentencePieceProcessor(model_file=model)
        specials = {t.content: i for i, t in tok.added_tokens_decoder.items()}
        cases = []
        for s in STRINGS:
            ref = llama_cpp_ids(sp, specials, s, False, sp.bos_id())
            hf = tok(s, add_special_tokens=False)["input_ids"]
            cases.append({
                "text": s,
                "ids": ref,
                "with_bos": [tok.bos_token_id] + ref,
                "transformers": hf,
                "transformers_agrees": hf == ref,
                "decoded": tok.decode(ref),
                "sentencepiece_decoded": sp.decode(ref) if not any(i in specials.values() for i in ref) else None,
            })
            if hf != ref:
                print(f"{style}: transformers differs on {s!r}: {hf} vs {ref}", file=sys.stderr)
        check_with_llama_cpp(os.path.join(out, "vocab.gguf"), cases)
        with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
            json.dump({"vocab_size": sp.get_piece_size(), "bos_token_id": tok.bos_token_id,
                       "cases": cases}, f, ensure_ascii=False, indent=1)
        print(out)


if __name__ == "__main__":
    main()
