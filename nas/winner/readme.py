"""The export folder's README, rendered from its manifest and recipe with the Jinja2 template
``templates/README.md.j2``: the prose lives in the template, where it reads as the Markdown it
becomes; this module only gathers what the template shows.

The environment is Markdown's: no autoescape (HTML entities would show as written), blocks trimmed
so that a line holding only a tag leaves nothing, and ``StrictUndefined`` so that a name the
template misspells fails the export instead of leaving a blank in the README. Two filters format
numbers as Python's format specs do: ``fmt`` always, ``figure`` with ``n/a`` for a figure that is
missing or not finite.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from nas.spec.arch import ArchSpec
from nas.spec.profile import MIB
from nas.winner import recipe as recipes

TEMPLATES = Path(__file__).with_name("templates")

# A budget's name ends in its unit (nas.spec.profile.Budgets); the README spells the unit out, so a
# budget added there gets a row here without being named twice. Longer suffixes first.
_UNITS = (("_ms_per_token", "ms/token"), ("_ms", "ms"), ("_mb", "MiB"))
_WORDS = {"model": "model size"}  # "model (MiB)" would read as the model's memory, another budget


def budget_label(name: str) -> str:
    """``decode_ms_per_token`` -> ``decode (ms/token)``: a budget's name in the README's table."""
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            words = name.removesuffix(suffix).replace("_", " ")
            return f"{_WORDS.get(words, words)} ({unit})"
    return name.replace("_", " ")


def _figure(value: Any, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


_ENV = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=False, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.filters.update(fmt=format, figure=_figure)


def render_readme(manifest: dict[str, Any], recipe: dict[str, Any]) -> str:
    """The export's README: figures with their labels and sources, the deployment files, the
    ecosystem configs and what they cannot express, and the full-training recipe in prose."""
    m = manifest["measurement"] or {}
    prof = manifest["profile"]
    provenance = m.get("provenance") or {}
    constraints = manifest.get("constraints") or {}
    budgets = [{"label": budget_label(name), "limit": limit, "margin": constraints.get(name)}
               for name, limit in (prof.get("budgets") or {}).items() if limit is not None]
    return _ENV.get_template("README.md.j2").render(
        manifest=manifest, recipe=recipe, spec=ArchSpec.from_dict(manifest["spec"]), m=m, prof=prof,
        where=prof.get("where") or "", budgets=budgets, base=manifest["baselines"] or {},
        brief=manifest["brief_training"], br=manifest["brief_result"] or {}, onnx=manifest["onnx"],
        label=m.get("label", "n/a"), host=provenance.get("host", provenance), w=m.get("workload") or {},
        hf=manifest["hf"], lit=manifest["litgpt"], MIB=MIB,
        CHINCHILLA_TOKENS_PER_PARAM=recipes.CHINCHILLA_TOKENS_PER_PARAM, TARGET_STEPS=recipes.TARGET_STEPS,
        MAX_BATCH_FACTOR=recipes.MAX_BATCH_FACTOR, MAX_LR_FACTOR=recipes.MAX_LR_FACTOR,
        MAX_SUBSET_EPOCHS=recipes.MAX_SUBSET_EPOCHS,
    )
