"""Small, safe expressions for the conditions and rules written in YAML files.

``"n_heads % n_kv_heads == 0 and 5e6 <= params <= 60e6"`` is parsed with :mod:`ast` and
interpreted node by node over a whitelist: names, numbers, strings, arithmetic, comparisons,
``and``/``or``/``not``, ``x if c else y``, tuples and lists (for ``in``), and the functions
``min``, ``max``, ``abs``. Nothing is passed to ``eval``; anything else is refused when the file
is loaded, with the offending construct named.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

from nas.spec.errors import NasError

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_FUNCS = {"min": min, "max": max, "abs": abs}


class ExprError(NasError, ValueError):
    """An expression that does not parse, uses a construct outside the whitelist, names an
    unknown variable, or fails while being evaluated (e.g. a division by zero)."""


class Expr:
    """A parsed expression; ``names`` are the variables it reads."""

    def __init__(self, text: str, known: set[str] | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ExprError("must be a non-empty expression string")
        try:
            self._tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise ExprError(f"cannot parse {text!r}: {e.msg}") from None
        self.text = text.strip()
        self.names: set[str] = set()
        self._check(self._tree)
        if known is not None:
            unknown = sorted(self.names - known)
            if unknown:
                raise ExprError(f"{self.text!r} names unknown {unknown[0]!r}; known here: {', '.join(sorted(known))}")

    def _check(self, node: ast.AST) -> None:
        match node:
            case ast.Name():
                self.names.add(node.id)
            case ast.Constant(value=v) if isinstance(v, (int, float, str, bool)):
                pass
            case ast.BinOp(op=op) if type(op) in _BINOPS:
                self._check(node.left)
                self._check(node.right)
            case ast.UnaryOp(op=ast.Not() | ast.USub() | ast.UAdd()):
                self._check(node.operand)
            case ast.BoolOp():
                for v in node.values:
                    self._check(v)
            case ast.Compare() if all(type(o) in _CMPOPS for o in node.ops):
                self._check(node.left)
                for c in node.comparators:
                    self._check(c)
            case ast.IfExp():
                for part in (node.test, node.body, node.orelse):
                    self._check(part)
            case ast.Tuple() | ast.List():
                for e in node.elts:
                    self._check(e)
            case ast.Call(func=ast.Name(id=fn)) if fn in _FUNCS and not node.keywords:
                for a in node.args:
                    self._check(a)
            case _:
                raise ExprError(f"{ast.unparse(node)!r} is not allowed in an expression")

    def __call__(self, env: Mapping[str, Any]) -> Any:
        try:
            return _eval(self._tree, env)
        except KeyError as e:
            raise ExprError(f"{self.text!r}: {e.args[0]!r} has no value here") from None
        except (ArithmeticError, TypeError) as e:
            raise ExprError(f"{self.text!r}: {e}") from None

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    match node:
        case ast.Name(id=name):
            return env[name]
        case ast.Constant(value=v):
            return v
        case ast.BinOp(left=a, op=op, right=b):
            return _BINOPS[type(op)](_eval(a, env), _eval(b, env))
        case ast.UnaryOp(op=ast.Not(), operand=x):
            return not _eval(x, env)
        case ast.UnaryOp(op=ast.USub(), operand=x):
            return -_eval(x, env)
        case ast.UnaryOp(op=ast.UAdd(), operand=x):
            return +_eval(x, env)
        case ast.BoolOp(op=ast.And(), values=vs):
            result: Any = True
            for v in vs:
                result = _eval(v, env)
                if not result:
                    return result
            return result
        case ast.BoolOp(op=ast.Or(), values=vs):
            result = False
            for v in vs:
                result = _eval(v, env)
                if result:
                    return result
            return result
        case ast.Compare(left=left, ops=ops, comparators=rights):
            a = _eval(left, env)
            for op, right in zip(ops, rights, strict=True):
                b = _eval(right, env)
                if not _CMPOPS[type(op)](a, b):
                    return False
                a = b
            return True
        case ast.IfExp(test=t, body=b, orelse=o):
            return _eval(b, env) if _eval(t, env) else _eval(o, env)
        case ast.Tuple(elts=es) | ast.List(elts=es):
            return tuple(_eval(e, env) for e in es)
        case ast.Call(func=ast.Name(id=fn), args=args):
            return _FUNCS[fn](*(_eval(a, env) for a in args))
    raise ExprError(f"cannot evaluate {ast.unparse(node)!r}")  # unreachable after _check
