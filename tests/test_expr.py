"""The YAML expression evaluator: every expression evaluates in bounded time and memory.

A rule is evaluated on every draw of a search, and a space file is loaded by ``nas spaces``: an
expression such as ``9**9**9**9`` must be refused (naming the part that is too large), not
computed for ever.
"""

from __future__ import annotations

import pytest

from nas.spec import expr as expr_module
from nas.spec.expr import MAX_DEPTH, MAX_INT_BITS, MAX_LENGTH, Expr, ExprError

# (expression that reads no variable, the part the message must name)
TOO_LARGE_CONSTANTS = [
    ("9**9**9**9 > 0", "9 ** 9 ** 9"),                        # a tower of powers
    ("10**100 > 0", "10 ** 100"),                             # one power past the integer limit
    ("2**255 * 2**255 > 0", "2 ** 255 * 2 ** 255"),           # a product past it
    ("(2**255 - 1) * 2 + 2 > 0", "(2 ** 255 - 1) * 2 + 2"),   # a sum past it
    ("1" + "0" * 100 + " > 0", "1000000"),                    # a literal past it
    ('"a" * 10**9 == ""', "'a' * 10 ** 9"),                   # string repetition
    ("[0] * 10**9", "[0] * 10 ** 9"),                         # list repetition
    ("10**9 * (0, 1)", "10 ** 9 * (0, 1)"),                   # repetition written the other way round
    ("((0,) * 100,) * 1000", "((0,) * 100,) * 1000"),         # nested tuples count their elements
    ('"ab" * 5000 + "c" > ""', "'ab' * 5000 + 'c'"),          # concatenation past the length limit
    ("'%0999999999d' % 1", "'%0999999999d' % 1"),             # %-formatting allocates its width
    ("(-8) ** 0.5 > 0", "(-8) ** 0.5"),                       # a complex result
]


@pytest.mark.parametrize("text,part", TOO_LARGE_CONSTANTS)
def test_a_part_too_large_to_compute_is_refused_when_parsed_naming_it(text, part):
    with pytest.raises(ExprError) as info:
        Expr(text)
    assert isinstance(info.value, expr_module.ExprLimitError)
    message = str(info.value)
    assert part in message and "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("text,env,part", [
    ("x ** y > 0", {"x": 10, "y": 10**6}, "x ** y"),
    ("'a' * n == ''", {"n": 10**7}, "'a' * n"),
    ("(n,) * n", {"n": MAX_LENGTH + 1}, "(n,) * n"),
    ("n * n * n > 0", {"n": 2**100}, "n * n * n"),
    ("n > 0", {"n": 2**300}, "n"),                            # a variable's own value is checked
])
def test_a_part_too_large_for_the_variables_given_is_refused_when_evaluated(text, env, part):
    e = Expr(text)  # parses: the size depends on the variables
    with pytest.raises(ExprError) as info:
        e(env)
    assert isinstance(info.value, expr_module.ExprLimitError)
    assert repr(part) in str(info.value), str(info.value)


def test_values_within_the_limits_still_evaluate():
    assert Expr(f"2**{MAX_INT_BITS - 1} > 0")({})
    assert Expr(f"-(2**{MAX_INT_BITS - 1} - 1 + 2**{MAX_INT_BITS - 1}) < 0")({})
    assert Expr("2 ** n")({"n": 64}) == 2**64
    assert Expr("len_ok == 'ab' * 5000")({"len_ok": "ab" * 5000})
    assert Expr(f"x in (0,) * {MAX_LENGTH // 2 - 1} + (x,)")({"x": 3})
    assert Expr("10 ** -400 == 0")({})                        # a negative power is a float, not a big integer
    assert Expr("2.0 ** 1000 > 1e300")({})
    assert Expr("1 ** (10**70) == 1 and (-1) ** (10**70 + 1) == -1 and 0 ** (10**70) == 0")({})
    assert Expr("d_model ** 0.5")({"d_model": 256}) == 16.0
    # Other failures are left to evaluation, as before: a branch never taken may hold them.
    assert Expr("1 / 0 if x else 2")({"x": False}) == 2
    with pytest.raises(ExprError, match="division"):
        Expr("1 / 0 if x else 2")({"x": True})
    with pytest.raises(ExprError, match="out of range"):
        Expr("1e308 ** 2 > 0")({})


def test_nesting_is_bounded_before_the_parser_or_the_interpreter_recurses_too_deeply():
    assert Expr(" + ".join(["x"] * (MAX_DEPTH - 1)))({"x": 1}) == MAX_DEPTH - 1
    for text in (" + ".join(["x"] * (MAX_DEPTH + 50)), "-" * 5000 + "1", "-" * 100_000 + "1"):
        with pytest.raises(ExprError, match="nested") as info:
            Expr(text)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
