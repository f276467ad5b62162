#!/usr/bin/env python3
"""Reads a GGUF file with llama.cpp's own reader (PyPI `gguf`, gguf.GGUFReader) and prints what
llama.cpp will see as one JSON object: version, scalar metadata, array lengths (with the first
items), and every tensor's name, shape (row-major, as in PyTorch) and ggml type name.

tests/it/export_model.rs runs it from the test venv (scripts/install-test-deps.sh) and asserts on
the result, so the export is checked by the reference implementation, not only by our reader.
Usage: gguf-inspect.py FILE.gguf
"""
import json
import sys

import gguf


def main(path: str) -> None:
    r = gguf.GGUFReader(path)
    meta = {}
    arrays = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        types = field.types
        if types and types[0] == gguf.GGUFValueType.ARRAY:
            items = field.contents()
            arrays[key] = {"len": len(items), "head": items[:8], "type": types[-1].name}
        else:
            meta[key] = field.contents()
    tensors = [
        {
            "name": t.name,
            # GGUFReader gives ggml's order (row length first); PyTorch order is the reverse.
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "type": t.tensor_type.name,
            "n_elements": int(t.n_elements),
            "n_bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]
    version = r.fields["GGUF.version"].contents()
    # numpy scalars (uint32, float32, ...) become plain numbers.
    plain = lambda o: o.item() if hasattr(o, "item") else str(o)  # noqa: E731
    print(json.dumps({"version": version, "alignment": r.alignment, "metadata": meta,
                      "arrays": arrays, "tensors": tensors}, default=plain))


if __name__ == "__main__":
    main(sys.argv[1])
