"""Search spaces: every shipped file loads and samples valid specs; bad files fail clearly."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from nas.spec.errors import ConfigError, NasError
from nas.spec.expr import Expr, ExprError
from nas.spec.space import InvalidSample, list_space_files, load_space, parse_space

SHIPPED = sorted(list_space_files())


def test_the_required_spaces_ship():
    assert {"gqa_small", "tiny", "attention_kinds"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_sample_satisfies_the_rules(name):
    space = load_space(name)
    rng = random.Random(7)
    for _ in range(100):
        spec = space.sample(rng)
        space.check_rules(spec)  # raises on a broken rule
        assert space.from_params({d.name: getattr(spec, d.name) for d in space.searchable
                                  if d.when is None or d.when(spec.to_dict())}) == spec


def test_gqa_small_spans_roughly_5m_to_60m_parameters():
    space = load_space("gqa_small")
    rng = random.Random(0)
    params = [space.sample(rng).params() for _ in range(300)]
    assert 5e6 <= min(params) < 10e6 and 40e6 < max(params) <= 60e6
    assert {s.attention for s in (space.sample(rng) for _ in range(20))} == {"gqa"}


def test_spaces_cover_every_dimension_and_attention_kind():
    rng = random.Random(1)
    for name in ("tiny", "attention_kinds"):
        specs = [load_space(name).sample(rng) for _ in range(400)]
        assert {s.attention for s in specs} == {"mha", "gqa", "mqa", "mla"}
        assert {s.layer_sharing for s in specs} == {"none", "block_repeat"}
        assert {s.bitwidth for s in specs} == {32, 16, 8, 4}
        for field in ("ffn", "activation", "norm", "tied_embeddings"):
            assert len({getattr(s, field) for s in specs}) > 1, field
    searched = {d.name for d in load_space("gqa_small").searchable}
    assert {"n_layers", "d_model", "n_heads", "n_kv_heads", "ffn", "ffn_ratio", "activation", "norm",
            "vocab_size", "tied_embeddings", "layer_sharing", "bitwidth"} <= searched


def test_optuna_trials_draw_specs_that_replay_from_their_params():
    space = load_space("attention_kinds")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    made = invalid = 0
    for _ in range(60):
        trial = study.ask()
        try:
            spec = space.suggest(trial)
        except InvalidSample:
            invalid += 1
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        assert space.from_params(trial.params) == spec
        # conditional dimensions are only suggested when active
        assert ("mla_latent_rank" in trial.params) == (spec.attention == "mla")
        assert ("n_kv_heads" in trial.params) == (spec.attention == "gqa")
        study.tell(trial, [1.0, 1.0])
        made += 1
    assert made > 10 and invalid > 0


MINIMAL = """
dimensions:
  vocab_size: {choices: [512]}
  d_model: {choices: [64]}
  n_layers: {low: 2, high: 4}
  n_heads: {choices: [4]}
  head_dim: {expr: "d_model // n_heads"}
"""


def test_a_minimal_space_uses_archspec_defaults():
    space = parse_space(MINIMAL, "mini.yaml", "mini")
    spec = space.sample(random.Random(0))
    assert spec.head_dim == 16 and spec.attention == "mha" and spec.n_kv_heads == 4
    assert space.training.tokens > 0


BAD = [
    ("dimensions: [1, 2]", "dimensions"),
    ("dimensions:\n  depth: {choices: [2]}", "dimensions.depth"),
    (MINIMAL + "  norm: {choices: [rmsnorm, batchnorm]}", "dimensions.norm.choices[1]"),
    (MINIMAL + "  bitwidth: {choices: [32, 3]}", "dimensions.bitwidth.choices[1]"),
    (MINIMAL + "  n_kv_heads: {choices: [2], when: \"attention == 'gqa'\"}", "dimensions.n_kv_heads.when"),
    (MINIMAL + "  ffn_ratio: {low: 4.0, high: 2.0}", "dimensions.ffn_ratio"),
    (MINIMAL + "  norm: {range: [1, 2]}", "dimensions.norm.range"),
    (MINIMAL + "  norm: {choices: []}", "dimensions.norm.choices"),
    (MINIMAL + "  activation: {choices: [silu], value: silu}", "dimensions.activation"),
    (MINIMAL + "  tied_embeddings: {choices: [yes_please]}", "dimensions.tied_embeddings.choices[0]"),
    (MINIMAL + "rules: [\"params > \"]", "rules[0]"),
    (MINIMAL + "rules: [\"__import__('os').system('true')\"]", "rules[0]"),
    (MINIMAL + "rules: [\"d_model.bit_length() > 2\"]", "rules[0]"),
    (MINIMAL + "rules: [\"widht > 2\"]", "rules[0]"),
    (MINIMAL + "rules: [\"params > 1e12\"]", "rules"),
    (MINIMAL + "training: {tokens: -5}", "training.tokens"),
    (MINIMAL + "training: {tokenz: 5}", "training.tokenz"),
    (MINIMAL + "extra: 1", "extra"),
    ("dimensions:\n  vocab_size: {choices: [512]}\n", "dimensions.d_model"),
    ("dimensions: {a: [1, 2}", "line"),
]


@pytest.mark.parametrize("text,key", BAD)
def test_invalid_space_names_file_and_key(text, key, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert key in message, message
    assert "\n" not in message


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(NasError, match=r"known: .*gqa_small"):
        load_space("gqa_smal")


def test_cli_reports_a_bad_space_in_one_line_with_exit_2(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(MINIMAL + "  norm: {choices: [batchnorm]}\n")
    proc = subprocess.run([sys.executable, "-m", "nas", "spaces", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "dimensions.norm.choices[0]" in lines[0] and "broken.yaml" in lines[0]


def test_cli_refuses_a_rule_too_large_to_evaluate_at_once_in_one_line(tmp_path):
    # 9**9**9**9 would compute for ever: the file must fail to load, naming the key and the part.
    path = tmp_path / "huge.yaml"
    path.write_text(MINIMAL + 'rules: ["9**9**9**9 > 0"]\n')
    proc = subprocess.run([sys.executable, "-m", "nas", "spaces", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert "huge.yaml" in lines[0] and "rules[0]" in lines[0] and "'9 ** 9 ** 9'" in lines[0], lines[0]


@pytest.mark.parametrize("rule,key,part", [
    ('"a" * 10**6 == ""', "rules[0]", "'a' * 10 ** 6"),
    ("[0] * 10**5 == ()", "rules[0]", "[0] * 10 ** 5"),
    # Sized by a variable: refused on every draw, so the space has no valid architecture.
    ("n_layers ** params > 0", "rules", "n_layers ** params"),
])
def test_a_space_whose_rule_is_too_large_to_evaluate_fails_to_load(rule, key, part, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(MINIMAL + f"rules: ['{rule.replace(chr(39), chr(39) * 2)}']\n")
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and repr(part) in message and "\n" not in message, message


def test_cli_sample_prints_specs_as_json():
    proc = subprocess.run([sys.executable, "-m", "nas", "sample", "--space", "tiny", "-n", "3", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    rows = json.loads(proc.stdout)
    assert len(rows) == 3 and all(r["params"] > 0 and len(r["arch_id"]) == 16 for r in rows)


def test_expressions_evaluate_and_refuse_unsafe_constructs():
    e = Expr("n_heads % n_kv_heads == 0 and 5e6 <= params <= 6e7 and attention in ('gqa', 'mqa')")
    assert e({"n_heads": 8, "n_kv_heads": 2, "params": 1e7, "attention": "gqa"})
    assert not e({"n_heads": 8, "n_kv_heads": 3, "params": 1e7, "attention": "gqa"})
    assert Expr("max(d_model // 64, 1) if x else -1")({"d_model": 256, "x": True}) == 4
    for bad in ("open('f')", "x.y", "x[0]", "lambda: 1", "[i for i in x]", "x := 3"):
        with pytest.raises(ExprError):
            Expr(bad)
    with pytest.raises(ExprError, match="division"):
        Expr("a // b")({"a": 1, "b": 0})


def test_shipped_spaces_are_found_outside_a_checkout(tmp_path):
    # the wheel carries them under nas/_data; the lookup must not depend on the working directory
    code = "from nas.spec.space import load_space; print(load_space('tiny').path)"
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).name == "tiny.yaml"
