"""transformers' greedy continuations of rlhf-bot's prompts on an `export-model --to hf` directory,
compared with rlhf-bot's own (`generate --format json` documents: prompt, completion). Prints one line per
prompt and dtype; exits 1 when an f32 continuation differs. Used by check-transformers-export.sh."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export_dir, ours_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
def documents(text):
    """The JSON documents of a file, one after the other (`generate --format json` pretty-prints)."""
    decoder, pos, out = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        doc, pos = decoder.raw_decode(text, pos)
        out.append(doc)


ours = documents(open(ours_file).read())
tok = AutoTokenizer.from_pretrained(export_dir)
print(f"transformers loaded {export_dir} (config dtype: "
      f"{json.load(open(export_dir + '/config.json')).get('torch_dtype', '?')})")
failed = False
for dtype in (torch.float32, torch.bfloat16):
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()
    for row in ours:
        ids = tok(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        theirs = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        a = tok(row["completion"], add_special_tokens=False)["input_ids"]
        b = tok(theirs, add_special_tokens=False)["input_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        verdict = "equal" if row["completion"] == theirs else f"first {same} tokens agree"
        print(f"{str(dtype).removeprefix('torch.'):8} {verdict:22} {row['prompt']!r}")
        if row["completion"] != theirs:
            print(f"   rlhf-bot:     {row['completion']!r}\n   transformers: {theirs!r}")
            failed |= dtype == torch.float32
sys.exit(1 if failed else 0)
