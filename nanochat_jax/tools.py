"""The calculator tool: what the model writes between <|python_start|> and <|python_end|>.

`calculate(expr)` returns the result as a string, or None when the expression is refused or fails;
the engine then forces nothing and generation simply continues (as the reference does).

Accepted language (everything else is refused before any evaluation):
  - int / float / str literals, parentheses, unary + and -,
  - binary + - * / // % ** on numbers, + on two strings, * between a string and an int,
  - calls of these str methods on string-valued expressions: count find rfind startswith endswith
    upper lower capitalize title swapcase strip lstrip rstrip replace,
  - len(<string expression>).
No names, attributes, subscripts, comprehensions, lambdas, imports or keyword arguments.

Why this cannot hang: we never call eval(). A tree walk computes each node only after checking that
its result stays small: ints at most MAX_DIGITS decimal digits (so `9**9**9` is refused from the
operands' sizes, before computing), strings at most MAX_STR_LEN characters (`'a'*10**9` is refused
from len * count), nesting at most MAX_DEPTH, source at most MAX_EXPR_LEN characters. Every single
operation therefore works on bounded operands, and the number of operations is bounded by the
source length, so the wall time is bounded without threads or subprocesses.
"""
from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPR_LEN = 1000  # characters of source
MAX_DEPTH = 32  # nesting of the syntax tree
MAX_DIGITS = 1000  # decimal digits of any integer, intermediate or final
MAX_STR_LEN = 10_000  # characters of any string, intermediate or final

STR_METHODS = frozenset({
    "count", "find", "rfind", "startswith", "endswith", "upper", "lower", "capitalize", "title",
    "swapcase", "strip", "lstrip", "rstrip", "replace",
})
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # "1,000" -> "1000" (the model writes numbers so)


class Refused(Exception):
    """The expression is outside the allowed language or its result would be too large."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(x):
    if isinstance(x, bool):
        return x
    if isinstance(x, int) and x.bit_length() > MAX_DIGITS * math.log2(10):
        raise Refused("integer too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise Refused("non-finite float")
    if isinstance(x, str) and len(x) > MAX_STR_LEN:
        raise Refused("string too long")
    return x


def _pow(base, exp):
    if not (_is_number(base) and _is_number(exp)):
        raise Refused("** needs numbers")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        # digits of the result, from the operands' sizes: refuse before computing
        if exp * math.log10(abs(base)) > MAX_DIGITS:
            raise Refused("power too large")
    result = base ** exp  # floats overflow with OverflowError; negative ** fraction gives complex
    if isinstance(result, complex):
        raise Refused("complex result")
    return result


def _binop(op: ast.operator, a, b):
    if isinstance(op, ast.Pow):
        return _pow(a, b)
    if _is_number(a) and _is_number(b):
        return _BINOPS[type(op)](a, b)
    if isinstance(op, ast.Add) and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR_LEN:
            raise Refused("string too long")
        return a + b
    if isinstance(op, ast.Mult) and {type(a), type(b)} == {str, int}:
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if len(s) * max(n, 0) > MAX_STR_LEN:
            raise Refused("string too long")
        return s * n
    raise Refused(f"unsupported operands for {type(op).__name__}")


def _call_method(s: str, name: str, args: list):
    if name == "replace":
        if len(args) != 2 or not all(isinstance(a, str) for a in args):
            raise Refused("replace takes two strings")
        old, new = args
        hits = len(s) + 1 if old == "" else s.count(old)
        if len(s) + hits * (len(new) - len(old)) > MAX_STR_LEN:
            raise Refused("string too long")
    if any(not isinstance(a, (str, int)) or isinstance(a, bool) for a in args):
        raise Refused("method arguments must be strings or ints")
    return getattr(s, name)(*args)


def _eval(node: ast.AST, depth: int):
    if depth > MAX_DEPTH:
        raise Refused("nested too deeply")
    d = depth + 1
    if isinstance(node, ast.Expression):
        return _eval(node.body, d)
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str)) or isinstance(node.value, bool):
            raise Refused(f"literal {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        v = _eval(node.operand, d)
        if not _is_number(v):
            raise Refused("unary sign needs a number")
        return _UNARY[type(node.op)](v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _check_size(_binop(node.op, _eval(node.left, d), _eval(node.right, d)))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_eval(a, d) for a in node.args]
        f = node.func
        if isinstance(f, ast.Name) and f.id == "len" and len(args) == 1 and isinstance(args[0], str):
            return len(args[0])
        if isinstance(f, ast.Attribute) and f.attr in STR_METHODS:
            s = _eval(f.value, d)
            if isinstance(s, str):
                return _check_size(_call_method(s, f.attr, args))
    raise Refused(f"{type(node).__name__} is not allowed")


def calculate(expr: str) -> str | None:
    """Evaluate one calculator expression; the result as a string, or None if refused or failing."""
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_LEN:
        return None
    if "'" not in expr and '"' not in expr:
        expr = _THOUSANDS.sub("", expr)
    try:
        tree = ast.parse(expr, mode="eval")
        return str(_eval(tree, 0))
    # SyntaxError/RecursionError/MemoryError from the parser on hostile input; arithmetic errors
    # (ZeroDivisionError, OverflowError, ValueError from str methods) from evaluation.
    except (Refused, SyntaxError, RecursionError, MemoryError, ArithmeticError, ValueError, TypeError):
        return None
