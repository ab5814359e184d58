"""The export's README, rendered from fixed manifests and compared with files kept in
``tests/fixtures/winner_readme/``.

The expected files were written by the f-string renderer before the README became a Jinja2
template, so they pin the text a user reads across that change and any later one: a Llama-expressible
GQA winner with every figure; an MLA winner with shared layers that neither Llama nor litgpt can
express, with no measurement, no baselines and a profile that no longer loads; an estimated MQA
winner whose budget is many epochs of a subset; one of the whole source, with a non-finite BPB and
a budget without a figure. Set ``NAS_WRITE_README_FIXTURES=1`` to rewrite the files after a
deliberate change to the text (and read the diff).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from nas.spec.arch import ArchSpec
from nas.spec.settings import TrainConfig
from nas.stages.hf import litgpt_incompatibilities, llama_incompatibilities
from nas.winner.readme import render_readme
from nas.winner.recipe import suggest_recipe

FIXTURES = Path(__file__).parent / "fixtures" / "winner_readme"

HOST_PROFILE = {"name": "host", "device": "this machine's CPU", "where": "local", "execution_provider": "cpu",
                "threads": 4, "workload": {"prompt_tokens": 64, "context_tokens": 128, "generate_tokens": 32,
                                           "batch": 1},
                "budgets": {"peak_memory_mb": 192.0, "decode_ms_per_token": 10.0, "prefill_ms": None,
                            "model_mb": 48.0}}
MEASUREMENT = {"id": 7, "label": "measured:local", "profile": "host", "bitwidth": 8, "decode_ms": 0.4321,
               "decode_p10_ms": 0.41, "decode_p90_ms": 0.47, "prefill_ms": 3.21, "prefill_p10_ms": 3.0,
               "prefill_p90_ms": 3.5, "peak_memory_bytes": 123_456_789, "model_bytes": 1_234_567,
               "workload": {"prompt_tokens": 64, "context_tokens": 128, "batch": 1, "warmup": 3, "repeats": 20},
               "provenance": {"host": {"cpu": "AMD EPYC 7B13", "threads": 4, "execution_provider": "cpu",
                                       "onnxruntime": "1.22.0"}},
               "created_at": "2025-01-02T03:04:05"}


def _manifest(spec: ArchSpec, **changes: Any) -> dict[str, Any]:
    hf, lit = llama_incompatibilities(spec), litgpt_incompatibilities(spec)
    manifest = {
        "format": "nas-export-v1", "study": "tiny", "trial": 3,
        "pick": {"how": "trial 3, chosen by --trial"},
        "arch_id": spec.arch_id, "summary": spec.summary(), "spec": spec.to_dict(),
        "params": spec.params(), "non_embedding_params": spec.non_embedding_params(),
        "space": "tiny", "profile": HOST_PROFILE,
        "corpus": {"data": "stdlib", "max_bytes": 300_000, "fingerprint": "abc123", "train_bytes": 270_000,
                   "val_bytes": 30_000, "train_tokens": 90_000},
        "tokenizer": {"file": "tokenizer.json", "vocab_size": spec.vocab_size, "eos_token": "<|endoftext|>",
                      "eos_token_id": 0, "sha256": "0" * 64},
        "brief_training": TrainConfig().model_dump(),
        "brief_result": {"tokens": 300_000, "steps": 73},
        "val_bpb": 2.71828, "baselines": {"bigram_bpb": 3.14159, "unigram_bpb": 4.5},
        "constraints": {"peak_memory_mb": -60.25, "decode_ms_per_token": -9.5679, "model_mb": -46.8},
        "feasible": True, "measurement": MEASUREMENT,
        "onnx": {"dir": "onnx", "bitwidth": spec.bitwidth, "total_bytes": 2_345_678, "tied_storage": "shared",
                 "quantized_ops": ["MatMul"], "embedding_quantized": False, "lm_head_quantized": True, "opset": 18},
        "hf": {"dir": None if hf else "hf", "not_expressible": hf},
        "litgpt": {"dir": None if lit else "litgpt", "not_expressible": lit},
    }
    manifest.update(changes)
    return manifest


def _recipe(spec: ArchSpec, train_tokens: int | None) -> dict[str, Any]:
    return suggest_recipe(spec, TrainConfig(), train_tokens=train_tokens)


def _cases() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    gqa = ArchSpec(vocab_size=512, d_model=64, n_layers=2, attention="gqa", n_heads=4, n_kv_heads=2, head_dim=16,
                   context_length=64, bitwidth=8)
    mla = ArchSpec(vocab_size=512, d_model=48, n_layers=4, layer_sharing="block_repeat", share_repeat=2,
                   attention="mla", n_heads=5, head_dim=16, mla_latent_rank=16, mla_rope_dim=8, context_length=64,
                   norm="layernorm", ffn="plain", activation="gelu", tied_embeddings=True, bitwidth=32)
    mqa = ArchSpec(vocab_size=1024, d_model=128, n_layers=4, attention="mqa", n_heads=4, head_dim=32,
                   context_length=128, bitwidth=4)
    estimated = {**MEASUREMENT, "label": "estimated:jetson (roofline from measured:local)",
                 "provenance": {"cpu": "Cortex-A78AE", "threads": 6, "execution_provider": "cpu",
                                "onnxruntime": "1.20.1"}}
    return {
        "gqa_measured": (_manifest(gqa), _recipe(gqa, 2_000_000)),
        "mla_nothing_measured": (
            _manifest(mla, measurement=None, baselines=None, brief_result=None, constraints=None, feasible=False,
                      profile={"name": "gone", "device": None, "budgets": None, "error": "no profile named 'gone'"},
                      onnx={"dir": "onnx", "bitwidth": 32, "total_bytes": 999_999, "tied_storage": "duplicated",
                            "quantized_ops": [], "embedding_quantized": False, "lm_head_quantized": False,
                            "opset": 18}),
            _recipe(mla, None)),
        "mqa_estimated_subset_overrun": (
            _manifest(mqa, measurement=estimated, profile={**HOST_PROFILE, "name": "jetson", "where": "estimate"},
                      pick={"how": "knee of the Pareto front (3 points over val_bpb, decode_ms)",
                            "front": [1, 3, 4]}),
            _recipe(mqa, 50_000)),
        "gqa_whole_source_overrun": (
            _manifest(gqa, val_bpb=math.nan, feasible=False,
                      profile={**HOST_PROFILE, "where": "ray",
                               "budgets": {**HOST_PROFILE["budgets"], "prefill_ms": 5.0}},
                      corpus={"data": "/data/code", "max_bytes": None, "fingerprint": "def456",
                              "train_bytes": 10_000, "val_bytes": 1_000, "train_tokens": 3_000}),
            _recipe(gqa, 3_000)),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_readme_text_is_unchanged_for_a_fixed_manifest(case: str) -> None:
    manifest, recipe = _cases()[case]
    text = render_readme(manifest, recipe)
    path = FIXTURES / f"{case}.md"
    if os.environ.get("NAS_WRITE_README_FIXTURES"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_every_budget_of_a_profile_gets_a_label_with_its_unit() -> None:
    # The README derives a budget's row label from its name, so a budget added to the profile needs no
    # second list here; one in a unit the README does not know yet shows up as a bare name instead.
    from nas.spec.profile import Budgets
    from nas.winner.readme import budget_label

    labels = {name: budget_label(name) for name in Budgets.model_fields}
    assert labels["decode_ms_per_token"] == "decode (ms/token)" and labels["model_mb"] == "model size (MiB)"
    assert all(label.endswith(")") for label in labels.values()), labels
