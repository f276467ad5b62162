"""Lists import cycles between the crate's modules, at the top level (`crate::feedback` ->
`crate::config`) and one level down (`model::llama` -> `model::lora`). Reads `use` paths from the
source text (comments and `#[cfg(test)]` modules left out); prints `no import cycles` or each cycle.
Run: python3 scripts/module-cycles.py (docs/architecture.md, "Rules the tree keeps")."""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "src")


def module_of(path):
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def node(parts):
    """A module's node: its top-level name, plus its child when the top level is a directory."""
    if len(parts) >= 2 and os.path.isdir(os.path.join(ROOT, parts[0])):
        return "::".join(parts[:2])
    return parts[0]


def edges():
    graph = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            parts = module_of(path)
            if not parts or parts[0] in ("lib", "main"):
                continue
            text = open(path, encoding="utf-8").read()
            text = re.sub(r"(?s)#\[cfg\(test\)\]\s*mod tests.*", "", text)
            text = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
            me = node(parts)
            for m in re.finditer(r"crate::([a-z_]+)(?:::([a-z_]+))?", text):
                target = [m.group(1)] + ([m.group(2)] if m.group(2) else [])
                other = node(target)
                if other != me and not me.startswith(other + "::") and not other.startswith(me + "::"):
                    graph.setdefault(me, set()).add(other)
            base = parts[:-1] if name != "mod.rs" else parts[:-1]
            for m in re.finditer(r"\bsuper::([a-z_]+)", text):
                other = node(base + [m.group(1)]) if base else m.group(1)
                if other != me and "::" in me:
                    graph.setdefault(me, set()).add(other)
    return graph


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    found = cycles(edges())
    if not found:
        print("no import cycles")
    for comp in found:
        print("cycle among: " + ", ".join(comp))
    sys.exit(1 if found else 0)
