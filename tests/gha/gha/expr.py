"""GitHub Actions expressions (`${{ ... }}`): a tokenizer, a parser and an evaluator.

It follows GitHub's documented semantics (docs.github.com, "Evaluate expressions in workflows and
actions"): literals (null, booleans, numbers incl. hex and exponents, single-quoted strings with
'' escapes), property access (`a.b`, `a['b']`, case-insensitive), `!`, `<`, `<=`, `>`, `>=`, `==`,
`!=`, `&&`, `||` with loose equality (type coercion to numbers, case-insensitive string compare),
`&&`/`||` returning an operand (not a boolean), and the functions contains, startsWith, endsWith,
format, join, toJSON, fromJSON, hashFiles and the status functions success, always, cancelled,
failure. Anything else (the `.*` object filter, unknown functions or operators) raises
ExprError: the harness must fail loudly rather than guess.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable


class ExprError(Exception):
    """An expression the harness cannot parse or evaluate (names the expression)."""


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass
class Tok:
    kind: str  # num, str, ident, op, end
    value: Any
    pos: int


_OPS = ["<=", ">=", "==", "!=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ".", ","]
_NUM = re.compile(r"0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "'":
            j = i + 1
            buf = []
            while True:
                if j >= len(text):
                    raise ExprError(f"unterminated string at {i} in `{text}`")
                if text[j] == "'":
                    if j + 1 < len(text) and text[j + 1] == "'":
                        buf.append("'")
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            toks.append(Tok("str", "".join(buf), i))
            i = j + 1
            continue
        if c == '"':
            raise ExprError(f"double-quoted strings are not valid in expressions (at {i} in `{text}`); use 'single quotes'")
        # A leading minus is part of a number literal only (GitHub has no unary minus operator).
        num_at = i + 1 if c == "-" else i
        starts_num = num_at < len(text) and (
            text[num_at].isdigit() or (text[num_at] == "." and num_at + 1 < len(text) and text[num_at + 1].isdigit())
        )
        if starts_num and (c == "-" or c.isdigit() or c == "."):
            m = _NUM.match(text, num_at)
            toks.append(Tok("num", _parse_number(text[i : m.end()]), i))
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m:
            toks.append(Tok("ident", m.group(0), i))
            i = m.end()
            continue
        for op in _OPS:
            if text.startswith(op, i):
                toks.append(Tok("op", op, i))
                i += len(op)
                break
        else:
            raise ExprError(f"unexpected character `{c}` at {i} in `{text}`")
    toks.append(Tok("end", None, len(text)))
    return toks


def _parse_number(lit: str) -> float:
    neg = lit.startswith("-")
    body = lit[1:] if neg else lit
    value = float(int(body, 16)) if body.lower().startswith("0x") else float(body)
    return -value if neg else value


# ---------------------------------------------------------------------------------------------
# AST: tuples ("lit", v) ("ctx", name) ("prop", obj, name) ("index", obj, expr) ("not", e)
# ("bin", op, a, b) ("call", name, [args])

_PRECEDENCE = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 4, "<=": 4, ">": 4, ">=": 4}


class Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def next(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, op: str) -> None:
        t = self.next()
        if t.kind != "op" or t.value != op:
            raise ExprError(f"expected `{op}` at {t.pos} in `{self.text}`, found {t.value!r}")

    def parse(self):
        node = self.binary(1)
        t = self.peek()
        if t.kind != "end":
            raise ExprError(f"unexpected {t.value!r} at {t.pos} in `{self.text}`")
        return node

    def binary(self, min_prec: int):
        left = self.unary()
        while True:
            t = self.peek()
            prec = _PRECEDENCE.get(t.value) if t.kind == "op" else None
            if prec is None or prec < min_prec:
                return left
            self.next()
            right = self.binary(prec + 1)
            left = ("bin", t.value, left, right)

    def unary(self):
        t = self.peek()
        if t.kind == "op" and t.value == "!":
            self.next()
            return ("not", self.unary())
        return self.postfix(self.primary())

    def primary(self):
        t = self.next()
        if t.kind == "num":
            return ("lit", t.value)
        if t.kind == "str":
            return ("lit", t.value)
        if t.kind == "op" and t.value == "(":
            node = self.binary(1)
            self.expect(")")
            return node
        if t.kind == "ident":
            low = t.value.lower()
            if low == "true":
                return ("lit", True)
            if low == "false":
                return ("lit", False)
            if low == "null":
                return ("lit", None)
            if low in ("nan", "infinity"):
                return ("lit", float(low.replace("infinity", "inf")))
            nxt = self.peek()
            if nxt.kind == "op" and nxt.value == "(":
                self.next()
                args = []
                if not (self.peek().kind == "op" and self.peek().value == ")"):
                    while True:
                        args.append(self.binary(1))
                        if self.peek().kind == "op" and self.peek().value == ",":
                            self.next()
                            continue
                        break
                self.expect(")")
                return ("call", low, args)
            return ("ctx", low)
        raise ExprError(f"unexpected {t.value!r} at {t.pos} in `{self.text}`")

    def postfix(self, node):
        while True:
            t = self.peek()
            if t.kind == "op" and t.value == ".":
                self.next()
                name = self.next()
                if name.kind == "op" and name.value == "*":
                    raise ExprError(f"the object filter `.*` is not supported by this harness (in `{self.text}`)")
                if name.kind != "ident":
                    raise ExprError(f"expected a property name after `.` at {name.pos} in `{self.text}`")
                node = ("prop", node, name.value)
            elif t.kind == "op" and t.value == "[":
                self.next()
                if self.peek().kind == "op" and self.peek().value == "*":
                    raise ExprError(f"the object filter `[*]` is not supported by this harness (in `{self.text}`)")
                idx = self.binary(1)
                self.expect("]")
                node = ("index", node, idx)
            else:
                return node


def parse(text: str):
    if "*" in text and not _star_in_strings_only(text):
        raise ExprError(f"the object filter `*` is not supported by this harness (in `{text}`)")
    return Parser(text).parse()


def _star_in_strings_only(text: str) -> bool:
    outside = re.sub(r"'(?:[^']|'')*'", "", text)
    return "*" not in outside


# ---------------------------------------------------------------------------------------------
# Values and coercions


def to_number(v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        if s == "":
            return 0.0
        try:
            if s.lower().startswith("0x"):
                return float(int(s, 16))
            return float(s)
        except ValueError:
            return math.nan
    return math.nan


def truthy(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return not (v == 0 or math.isnan(v))
    if isinstance(v, str):
        return v != ""
    return True


def to_string(v: Any) -> str:
    """How GitHub turns a value into text (interpolation, format, join)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        f = float(v)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "Infinity" if f > 0 else "-Infinity"
        if f == int(f) and abs(f) < 1e15:
            return str(int(f))
        return repr(f)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "Array"
    return "Object"


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    if isinstance(v, str):
        return "str"
    return "obj"


def loose_eq(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka == kb:
        if ka == "str":
            return a.lower() == b.lower()
        if ka == "num":
            return float(a) == float(b)
        if ka == "obj":
            return a is b
        return a == b
    if ka == "obj" or kb == "obj":
        return False
    x, y = to_number(a), to_number(b)
    return x == y


def _compare(op: str, a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka == "str" and kb == "str":
        x, y = a.lower(), b.lower()
    elif ka == "obj" or kb == "obj":
        return False
    else:
        x, y = to_number(a), to_number(b)
        if math.isnan(x) or math.isnan(y):
            return False
    return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]


def get_prop(obj: Any, name: Any) -> Any:
    if isinstance(obj, dict):
        if not isinstance(name, str):
            name = to_string(name)
        if name in obj:
            return obj[name]
        low = name.lower()
        for k, v in obj.items():
            if isinstance(k, str) and k.lower() == low:
                return v
        return None
    if isinstance(obj, list):
        if isinstance(name, str):
            return None
        n = to_number(name)
        if math.isnan(n) or n < 0 or int(n) != n or int(n) >= len(obj):
            return None
        return obj[int(n)]
    return None


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Scope:
    """What an expression can see: the contexts by lower-case name, the status functions, and the
    workspace for hashFiles. `allowed` lists the contexts available at this place in the workflow;
    using another one is an error, as GitHub reports it."""

    contexts: dict
    status: Callable[[str], bool] | None = None
    hash_files: Callable[[list[str]], str] | None = None
    where: str = ""


_FORMAT_RE = re.compile(r"\{\{|\}\}|\{(\d+)\}|\{|\}")


def _format(fmt: str, args: list, text: str) -> str:
    out = []
    pos = 0
    for m in _FORMAT_RE.finditer(fmt):
        out.append(fmt[pos : m.start()])
        tok = m.group(0)
        if tok == "{{":
            out.append("{")
        elif tok == "}}":
            out.append("}")
        elif m.group(1) is not None:
            i = int(m.group(1))
            if i >= len(args):
                raise ExprError(f"format(): index {i} has no argument in `{text}`")
            out.append(to_string(args[i]))
        else:
            raise ExprError(f"format(): unbalanced brace in {fmt!r} (in `{text}`)")
        pos = m.end()
    out.append(fmt[pos:])
    return "".join(out)


def _to_json(v: Any) -> str:
    def norm(x):
        if isinstance(x, float) and x == int(x) and not math.isinf(x):
            return int(x)
        if isinstance(x, dict):
            return {k: norm(val) for k, val in x.items()}
        if isinstance(x, list):
            return [norm(val) for val in x]
        return x

    return json.dumps(norm(v), indent=2)


def _from_json(s: Any, text: str) -> Any:
    if not isinstance(s, str):
        raise ExprError(f"fromJSON() wants a string, got {to_string(s)!r} in `{text}`")
    try:
        return _numbers_to_float(json.loads(s))
    except json.JSONDecodeError as e:
        raise ExprError(f"fromJSON(): {s!r} is not JSON ({e}) in `{text}`") from None


def _numbers_to_float(x):
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return float(x)
    if isinstance(x, dict):
        return {k: _numbers_to_float(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers_to_float(v) for v in x]
    return x


_ARITY = {
    "contains": (2, 2),
    "startswith": (2, 2),
    "endswith": (2, 2),
    "format": (1, None),
    "join": (1, 2),
    "tojson": (1, 1),
    "fromjson": (1, 1),
    "hashfiles": (1, None),
    "success": (0, 0),
    "always": (0, 0),
    "cancelled": (0, 0),
    "failure": (0, 0),
}


def evaluate(node, scope: Scope, text: str) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "ctx":
        name = node[1]
        if name not in scope.contexts:
            where = f" in {scope.where}" if scope.where else ""
            raise ExprError(f"unrecognized named-value `{name}`{where} (in `{text}`); available here: {', '.join(sorted(scope.contexts))}")
        return scope.contexts[name]
    if kind == "prop":
        return get_prop(evaluate(node[1], scope, text), node[2])
    if kind == "index":
        return get_prop(evaluate(node[1], scope, text), evaluate(node[2], scope, text))
    if kind == "not":
        return not truthy(evaluate(node[1], scope, text))
    if kind == "bin":
        op = node[1]
        if op == "&&":
            left = evaluate(node[2], scope, text)
            return evaluate(node[3], scope, text) if truthy(left) else left
        if op == "||":
            left = evaluate(node[2], scope, text)
            return left if truthy(left) else evaluate(node[3], scope, text)
        a = evaluate(node[2], scope, text)
        b = evaluate(node[3], scope, text)
        if op == "==":
            return loose_eq(a, b)
        if op == "!=":
            return not loose_eq(a, b)
        return _compare(op, a, b)
    if kind == "call":
        name, args = node[1], node[2]
        if name not in _ARITY:
            raise ExprError(f"unknown function `{name}` in `{text}`")
        lo, hi = _ARITY[name]
        if len(args) < lo or (hi is not None and len(args) > hi):
            raise ExprError(f"{name}() takes {lo}..{hi if hi is not None else 'n'} arguments, got {len(args)} in `{text}`")
        if name in ("success", "always", "cancelled", "failure"):
            if scope.status is None:
                raise ExprError(f"{name}() is only valid in `if:` conditions (in `{text}`)")
            return scope.status(name)
        vals = [evaluate(a, scope, text) for a in args]
        if name == "contains":
            hay, needle = vals
            if isinstance(hay, list):
                return any(loose_eq(x, needle) for x in hay)
            if isinstance(hay, dict):
                raise ExprError(f"contains() on an object is not defined (in `{text}`)")
            return to_string(needle).lower() in to_string(hay).lower()
        if name == "startswith":
            return to_string(vals[0]).lower().startswith(to_string(vals[1]).lower())
        if name == "endswith":
            return to_string(vals[0]).lower().endswith(to_string(vals[1]).lower())
        if name == "format":
            return _format(to_string(vals[0]), vals[1:], text)
        if name == "join":
            sep = to_string(vals[1]) if len(vals) > 1 else ","
            if isinstance(vals[0], list):
                return sep.join(to_string(x) for x in vals[0])
            return to_string(vals[0])
        if name == "tojson":
            return _to_json(vals[0])
        if name == "fromjson":
            return _from_json(vals[0], text)
        if name == "hashfiles":
            if scope.hash_files is None:
                raise ExprError(f"hashFiles() is not available here (in `{text}`)")
            return scope.hash_files([to_string(v) for v in vals])
    raise ExprError(f"cannot evaluate node {kind} in `{text}`")


def eval_expr(text: str, scope: Scope) -> Any:
    return evaluate(parse(text), scope, text)


# ---------------------------------------------------------------------------------------------
# Templates: strings with ${{ }} inside


def _split_template(s: str) -> list[tuple[str, str]]:
    """[("text", ...), ("expr", ...)]; a `}}` inside a string literal does not end the expression."""
    parts = []
    i = 0
    while True:
        start = s.find("${{", i)
        if start < 0:
            parts.append(("text", s[i:]))
            return parts
        parts.append(("text", s[i:start]))
        j = start + 3
        in_str = False
        while j < len(s):
            if in_str:
                if s[j] == "'":
                    if j + 1 < len(s) and s[j + 1] == "'":
                        j += 2
                        continue
                    in_str = False
            elif s[j] == "'":
                in_str = True
            elif s.startswith("}}", j):
                break
            j += 1
        else:
            raise ExprError(f"unterminated `${{{{` in {s!r}")
        parts.append(("expr", s[start + 3 : j].strip()))
        i = j + 2


def has_expr(value: Any) -> bool:
    return isinstance(value, str) and "${{" in value


def interpolate(value: Any, scope: Scope) -> Any:
    """A YAML scalar with ${{ }} inside. A value that is exactly one expression keeps the
    expression's type (GitHub does this for `with:`, `if:`, `outputs`); otherwise the parts are
    joined as text."""
    if not isinstance(value, str) or "${{" not in value:
        return value
    parts = [p for p in _split_template(value) if not (p[0] == "text" and p[1] == "")]
    if len(parts) == 1 and parts[0][0] == "expr":
        return eval_expr(parts[0][1], scope)
    out = []
    for kind, body in parts:
        out.append(body if kind == "text" else to_string(eval_expr(body, scope)))
    return "".join(out)


def interpolate_str(value: Any, scope: Scope) -> str:
    return to_string(interpolate(value, scope)) if value is not None else ""


def uses_status_function(text: str) -> bool:
    node = parse(text)

    def walk(n) -> bool:
        if n[0] == "call" and n[1] in ("success", "always", "cancelled", "failure"):
            return True
        return any(walk(c) for c in n[1:] if isinstance(c, tuple)) or any(
            walk(a) for c in n[1:] if isinstance(c, list) for a in c
        )

    return walk(node)


def condition(raw: Any, scope: Scope) -> bool:
    """An `if:`: with or without ${{ }}; without a status function it means `success() && (...)`."""
    if raw is None:
        text = "success()"
    elif isinstance(raw, bool):
        text = "true" if raw else "false"
    elif isinstance(raw, (int, float)):
        text = to_string(raw)
    else:
        text = str(raw).strip()
        if "${{" in text:
            parts = [p for p in _split_template(text) if not (p[0] == "text" and p[1].strip() == "")]
            if len(parts) != 1 or parts[0][0] != "expr":
                raise ExprError(f"`if: {raw}` mixes text and ${{{{ }}}}; GitHub evaluates such a string as always true, which is almost certainly a bug")
            text = parts[0][1]
    if not uses_status_function(text):
        text = f"success() && ({text})"
    return truthy(eval_expr(text, scope))
