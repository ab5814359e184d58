"""Small, safe expressions for the conditions and rules written in YAML files.

``"n_heads % n_kv_heads == 0 and 5e6 <= params <= 60e6"`` is parsed with :mod:`ast` and
interpreted node by node over a whitelist: names, numbers, strings, arithmetic, comparisons,
``and``/``or``/``not``, ``x if c else y``, tuples and lists (for ``in``), and the functions
``min``, ``max``, ``abs``. Nothing is passed to ``eval``; anything else is refused when the file
is loaded, with the offending construct named.

Every expression evaluates in bounded time and memory, because a rule is evaluated on every
draw of a search and a file is loaded by ``nas spaces`` and ``nas search`` alike: ``9**9**9**9``
would otherwise compute for ever and ``"a" * 10**9`` fill the memory. So every value is kept
small (integers of at most ``MAX_INT_BITS`` bits, strings and tuples of at most ``MAX_LENGTH``
characters and elements, nested ones counted in, no complex numbers), a power or a repetition is
refused *before* it is computed when its result would break that, the ``%`` string formatting is
refused outright (its widths allocate), and a tree may be at most ``MAX_DEPTH`` nodes deep (the
parser and this interpreter recurse). A breach is an :class:`ExprLimitError` naming the construct;
one that needs no variable (``9**9**9**9 > 0``) is found when the expression is parsed, so the
file fails to load with its key named rather than on every draw.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from typing import Any

from nas.spec.errors import NasError

# Far above any architecture figure (parameter counts, bytes: well under 2**64) and still cheap to
# multiply; a rule needs nothing bigger.
MAX_INT_BITS = 256
# Characters of a string, elements of a tuple (nested ones counted): room for any list written
# in a rule, small enough that comparing or searching two of them is instant.
MAX_LENGTH = 10_000
# Nesting of the expression tree: a rule of 100 chained terms is already unreadable.
MAX_DEPTH = 100

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


class ExprLimitError(ExprError):
    """An expression whose value, or the value of one of its parts, would be too large to compute
    safely (see the module's limits); the message names the part."""


class Expr:
    """A parsed expression; ``names`` are the variables it reads."""

    def __init__(self, text: str, known: set[str] | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ExprError("must be a non-empty expression string")
        try:
            self._tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise ExprError(f"cannot parse {text!r}: {e.msg}") from None
        except (MemoryError, RecursionError):  # the parser's own stack, on thousands of nested operators
            raise ExprLimitError(f"cannot parse {_show(text.strip())}: nested too deeply") from None
        self.text = text.strip()
        self.names: set[str] = set()
        constant_parts: list[ast.AST] = []
        if self._check(self._tree, 1, constant_parts):
            constant_parts = [self._tree]
        for part in constant_parts:
            _check_constant(part, self.text)
        if known is not None:
            unknown = sorted(self.names - known)
            if unknown:
                raise ExprError(f"{self.text!r} names unknown {unknown[0]!r}; known here: {', '.join(sorted(known))}")

    def _check(self, node: ast.AST, depth: int, constant_parts: list[ast.AST]) -> bool:
        """Refuse what is outside the whitelist; collect the names read, and the largest parts
        that read none (``constant_parts``) to evaluate once now. True when ``node`` reads no name."""
        if depth > MAX_DEPTH:
            raise ExprLimitError(f"{_show(self.text)}: nested more than {MAX_DEPTH} deep")
        match node:
            case ast.Name():
                self.names.add(node.id)
                return False
            case ast.Constant(value=v) if isinstance(v, (int, float, str, bool)):
                _check_value(v, node)
                return True
            case ast.BinOp(op=op) if type(op) in _BINOPS:
                children = [node.left, node.right]
            case ast.UnaryOp(op=ast.Not() | ast.USub() | ast.UAdd()):
                children = [node.operand]
            case ast.BoolOp():
                children = list(node.values)
            case ast.Compare() if all(type(o) in _CMPOPS for o in node.ops):
                children = [node.left, *node.comparators]
            case ast.IfExp():
                children = [node.test, node.body, node.orelse]
            case ast.Tuple() | ast.List():
                children = list(node.elts)
            case ast.Call(func=ast.Name(id=fn)) if fn in _FUNCS and not node.keywords:
                children = list(node.args)
            case _:
                raise ExprError(f"{ast.unparse(node)!r} is not allowed in an expression")
        constant = [self._check(c, depth + 1, constant_parts) for c in children]
        if all(constant):
            return True
        constant_parts.extend(c for c, const in zip(children, constant, strict=True) if const)
        return False

    def __call__(self, env: Mapping[str, Any]) -> Any:
        try:
            return _eval(self._tree, env)
        except KeyError as e:
            raise ExprError(f"{self.text!r}: {e.args[0]!r} has no value here") from None
        except ExprLimitError as e:
            raise ExprLimitError(f"{_show(self.text)}: {e}") from None
        except (ArithmeticError, TypeError, ValueError) as e:
            raise ExprError(f"{self.text!r}: {e}") from None

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def _check_constant(node: ast.AST, text: str) -> None:
    """Evaluate a part that reads no variable, so that a size limit it breaks fails the file when
    it is loaded. Other failures (``1 / 0``) are left to evaluation, as before: a branch that is
    never taken may hold them."""
    try:
        _eval(node, {})
    except ExprLimitError as e:
        raise ExprLimitError(f"{_show(text)}: {e}") from None
    except (ArithmeticError, TypeError, ValueError):
        pass


def _show(part: ast.AST | str) -> str:
    """A part of an expression for a message, cut short: the parts refused for their size may be
    long."""
    text = part if isinstance(part, str) else ast.unparse(part)
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _size(value: Any, limit: int = MAX_LENGTH) -> int:
    """Characters of a string, elements of a tuple with those of the strings and tuples inside;
    counting stops once past ``limit`` (a tuple may repeat one large tuple many times, so a full
    count could take long)."""
    if isinstance(value, str):
        return len(value)
    total = 0
    if isinstance(value, tuple):
        for v in value:
            total += 1 + _size(v, limit - total)
            if total > limit:
                break
    return total


def _check_value(value: Any, node: ast.AST) -> Any:
    """``value`` if it is within the limits, else ExprLimitError naming ``node``."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ExprLimitError(f"{_show(node)} is an integer of {value.bit_length()} bits; "
                             f"the limit is {MAX_INT_BITS}")
    if isinstance(value, complex):
        raise ExprLimitError(f"{_show(node)} has no real value")
    if isinstance(value, (str, tuple)) and _size(value) > MAX_LENGTH:
        raise ExprLimitError(f"{_show(node)} has more than {MAX_LENGTH:,} characters or elements")
    return value


def _binop(node: ast.BinOp, a: Any, b: Any) -> Any:
    """``a op b``, refused before it is computed where its result alone could take unbounded time
    or memory (a power, a repetition, a string format); the result is checked as any value."""
    op = type(node.op)
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        bits = b * math.log2(abs(a))
        if bits > MAX_INT_BITS:
            raise ExprLimitError(f"{_show(node)} would be an integer of about {bits:.3g} bits; "
                                 f"the limit is {MAX_INT_BITS}")
    if op is ast.Mult:
        seq, times = (a, b) if isinstance(a, (str, tuple)) else (b, a)
        if isinstance(seq, (str, tuple)) and isinstance(times, int) and _size(seq) * times > MAX_LENGTH:
            raise ExprLimitError(f"{_show(node)} would have about {float(_size(seq) * times):.3g} characters "
                                 f"or elements; the limit is {MAX_LENGTH:,}")
    if op is ast.Mod and isinstance(a, str):
        raise ExprLimitError(f"{_show(node)}: string formatting with % is not allowed in an expression")
    return _BINOPS[op](a, b)


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    return _check_value(_eval_node(node, env), node)


def _eval_node(node: ast.AST, env: Mapping[str, Any]) -> Any:
    match node:
        case ast.Name(id=name):
            return env[name]
        case ast.Constant(value=v):
            return v
        case ast.BinOp(left=a, right=b):
            return _binop(node, _eval(a, env), _eval(b, env))
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
