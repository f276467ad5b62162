"""llama.cpp's own greedy continuation of a prompt on a GGUF file (an `rlhf-bot export-model --to
gguf-f16|gguf-q8_0` export), through llama-cpp-python (`pip install llama-cpp-python`: it builds
llama.cpp from source, ~10 min on 2 cores). Prints the architecture llama.cpp read, whether the chat
template is there, and the continuation as a JSON string, to compare with
`rlhf-bot generate --model FILE --prompt PROMPT --max-new-tokens N`.
With a fourth argument, llama.cpp applies that LoRA adapter GGUF (`export-model --to gguf-lora`)
over FILE, as `llama-cli --lora` does.
Usage: python scripts/llamacpp-greedy.py FILE.gguf PROMPT N [ADAPTER.gguf]"""
import json
import sys

from llama_cpp import Llama

path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lora = sys.argv[4] if len(sys.argv) > 4 else None
llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, lora_path=lora)
meta = llm.metadata
print("architecture:", meta.get("general.architecture"), "| chat template:", "tokenizer.chat_template" in meta)
out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
print(json.dumps(out["choices"][0]["text"]))
