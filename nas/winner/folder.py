"""Export the winner of a study: one folder with everything needed to deploy it or train it fully.

``nas export STUDY --trial N | --pick knee | --pick best-under --max-decode-ms X --out DIR``
chooses a trial, then writes::

    DIR/
      README.md           its figures with their labels, the profile and budgets, how to train it fully
      arch.json           the ArchSpec (canonical fields; ``ArchSpec.from_json`` reads it back)
      arch.yaml           the same, for people
      tokenizer.json      the BPE the trial was trained with (study corpus, its vocab size)
      model.pt            trained weights as the search wrote them: {"spec", "state_dict", "train_config"}
      onnx/               the quantized model that was scored (and, below fp32, its fp32 source in onnx/fp32)
      recipe.json         a full-training recipe (token budgets, batch, learning rate, warm-up, schedule)
      export.json         this export's manifest (study, trial, pick, figures, corpus): what `nas train` reads
      hf/                 LlamaForCausalLM config + safetensors + tokenizer, where Llama can express the spec
      litgpt/             litgpt model_config.yaml, where litgpt can express it

Picking (:func:`pick_trial`):

- ``--trial N``: that trial, if it completed (a failed, infeasible or running trial has no trained
  model to export).
- ``--pick knee``: the stored Pareto front's point closest to the utopia point. Each of the
  study's objectives is min-max normalized over the front to [0, 1] (0 = the front's best, 1 its
  worst; an objective equal on every point counts 0 for all), so that milliseconds and bits per
  byte weigh alike; the utopia point is 0 in every objective (each best at once, usually
  unreachable); the knee is the point at the smallest Euclidean distance from it, ties to the
  lower trial number. It is the balanced compromise, not the best at anything.
- ``--pick best-under --max-decode-ms X``: the lowest BPB among complete trials within every
  budget of the profile whose decode latency (the measurement's median, with its label) is at
  most X ms.

The tokenizer is not stored with a trial: it is the cached BPE of the study's corpus for the
spec's vocabulary. The corpus is rebuilt from the study row (``extra.data``, ``extra.max_bytes``),
its fingerprint checked against the study's, and the cached file copied; a missing cache entry
is an error naming the ``NAS_CACHE_DIR`` the search must have used, never a silently retrained
(and possibly different) tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.settings import TrainConfig

if TYPE_CHECKING:
    from nas.stages.data import Corpus
    from nas.store import Store, StudyRow, TrialRow

EXPORT_FORMAT = "nas-export-v1"
MANIFEST = "export.json"
PICKS = ("knee", "best-under")
MIB = 2**20

# Full-training recipe (see suggest_recipe and the README it writes).
CHINCHILLA_TOKENS_PER_PARAM = 20
OVERTRAINED_TOKENS_PER_PARAM = (100, 1000)
TARGET_STEPS = 5000
"""Grow the batch until a budget takes about this many optimizer steps (never shrink it)."""
MAX_BATCH_FACTOR = 8
"""At most 8x the brief training's batch: there is no gradient accumulation, and the brief batch is
what was known to fit."""
MAX_LR_FACTOR = 2.0
MAX_SUBSET_EPOCHS = 4
"""`nas train` keeps the study's corpus subset while the budget is at most this many epochs of it,
else it trains on the whole source. Repeated data returns less and less past a few epochs
(Muennighoff et al. 2023, "Scaling data-constrained language models"); measured here, 29 epochs of
a 300 kB subset (90k tokens) took a 129k-param model's validation BPB from 2.81 at mid-run back up
to 2.85 at the end while its training loss kept falling."""


class WinnerError(NasError):
    """A trial that cannot be picked or exported (unknown, failed, none under a limit, files missing)."""


# --- picking ------------------------------------------------------------------------------------


def knee_index(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> int:
    """Index of the row of ``values`` (front points x objectives) closest to the utopia point after
    min-max normalizing each objective over the rows (module docstring); the first on a tie."""
    points = np.asarray(values, dtype=float)
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] != len(directions):
        raise WinnerError(f"knee: need a non-empty (points x {len(directions)}) table, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise WinnerError("knee: objective values must be finite")
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    p = points * sign  # every column now minimized
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    normalized = (p - lo) / span  # 0 = best on the front; a constant column is 0 everywhere
    distance = np.sqrt((normalized**2).sum(axis=1))
    return int(np.argmin(distance))  # argmin returns the first minimum: rows come by trial number


@dataclass(frozen=True)
class Pick:
    """The chosen trial and why, in words for the README and the CLI."""

    number: int
    how: str
    details: dict[str, Any] = field(default_factory=dict)


def _decode_ms(store: Store, trial: TrialRow) -> tuple[float | None, str | None]:
    """The trial's decode latency (median ms/token) and its label, from its measurement."""
    if trial.measurement_id is not None:
        m = store.get_measurement(id=trial.measurement_id)
        return m.decode_ms_per_token, m.label
    value = (trial.objectives or {}).get("decode_ms")
    return value, None


def _exportable(trial: TrialRow, study: str) -> None:
    if trial.state == "complete":
        return
    if trial.state == "failed":
        raise WinnerError(f"trial {trial.number} of study {study!r} failed at {trial.failed_stage}: "
                          f"{trial.failure_reason}; it has no trained model to export")
    if trial.state == "infeasible":
        raise WinnerError(f"trial {trial.number} of study {study!r} is infeasible ({trial.failed_stage}: "
                          f"{trial.failure_reason}); it was never trained")
    raise WinnerError(f"trial {trial.number} of study {study!r} is still {trial.state}; export it when it completes")


def pick_trial(store: Store, study: str, *, trial: int | None = None, pick: str | None = None,
               max_decode_ms: float | None = None) -> Pick:
    """Choose the trial to export: exactly one of ``trial`` or ``pick`` (module docstring)."""
    if (trial is None) == (pick is None):
        raise WinnerError("choose the trial with exactly one of --trial N or --pick knee|best-under")
    if pick is not None and pick not in PICKS:
        raise WinnerError(f"unknown --pick {pick!r}; choose one of {', '.join(PICKS)}")
    if pick == "best-under" and max_decode_ms is None:
        raise WinnerError("--pick best-under needs --max-decode-ms X (decode latency limit, ms/token)")
    if max_decode_ms is not None and pick != "best-under":
        raise WinnerError("--max-decode-ms only applies to --pick best-under")
    if max_decode_ms is not None and not (math.isfinite(max_decode_ms) and max_decode_ms > 0):
        raise WinnerError(f"--max-decode-ms must be a positive number of milliseconds, got {max_decode_ms}")
    st = store.get_study(name=study)

    if trial is not None:
        row = store.find_trial(study=study, number=trial)
        if row is None:
            numbers = [t.number for t in store.trials(study=study)]
            known = f"trials {min(numbers)}-{max(numbers)}" if numbers else "no trials yet"
            raise WinnerError(f"no trial {trial} in study {study!r} ({known})")
        _exportable(row, study)
        note = "" if row.feasible else " (over a budget of the profile: see the constraints)"
        return Pick(trial, f"trial {trial}, chosen by --trial{note}")

    if pick == "knee":
        front = [t for t in store.pareto(study=study) if t.state == "complete"]
        if not front:
            raise WinnerError(f"study {study!r} has no Pareto front yet (no complete trial within the budgets)")
        names = [o.name for o in st.objectives]
        values = [[(t.objectives or {}).get(n, math.nan) for n in names] for t in front]
        i = knee_index(values, [o.direction for o in st.objectives])
        chosen = front[i]
        how = (f"knee of the Pareto front ({len(front)} point{'s' if len(front) != 1 else ''} over "
               f"{', '.join(names)}): the point closest to the utopia point after min-max normalizing each "
               "objective over the front")
        return Pick(chosen.number, how, {"front": [t.number for t in front], "objectives": names})

    assert max_decode_ms is not None  # checked above; narrows the type
    candidates = []
    fastest: tuple[float, int] | None = None
    for t in store.trials(study=study, states=["complete"]):
        if not t.feasible or t.val_bpb is None:
            continue
        ms, label = _decode_ms(store, t)
        if ms is None:
            continue
        if fastest is None or ms < fastest[0]:
            fastest = (ms, t.number)
        if ms <= max_decode_ms:
            candidates.append((t.val_bpb, t.number, ms, label))
    if not candidates:
        if fastest is None:
            raise WinnerError(f"study {study!r} has no complete trial within its budgets to choose from")
        raise WinnerError(f"no complete trial of study {study!r} within its budgets decodes in <= {max_decode_ms:g} "
                          f"ms/token; the fastest is trial {fastest[1]} at {fastest[0]:.4g} ms")
    bpb, number, ms, label = min(candidates)
    how = (f"lowest BPB ({bpb:.4f}) among the {len(candidates)} complete trial(s) within the budgets that decode in "
           f"<= {max_decode_ms:g} ms/token (this one: {ms:.4g} ms, {label or 'unlabelled'})")
    return Pick(number, how, {"max_decode_ms": max_decode_ms, "candidates": len(candidates)})


# --- the full-training recipe -------------------------------------------------------------------


def suggest_recipe(spec: ArchSpec, brief: TrainConfig, *, tokens: int | None = None, batch_size: int | None = None,
                   lr: float | None = None, train_tokens: int | None = None) -> dict[str, Any]:
    """A full-training plan for ``spec``, scaled from the study's brief training ``brief``.

    - Tokens: Chinchilla's compute-optimal ~20 tokens per parameter (Hoffmann et al. 2022) by
      default; small models meant for deployment are trained far past it, because inference cost
      and not training cost is what they save (100-1000+ tokens per parameter: TinyLlama 1.1B on
      3T tokens, ~2,700/param; Llama 3 8B on 15T, ~1,900/param).
    - Batch: the brief batch grown by a power of two k (1..8) until the budget takes about
      ``TARGET_STEPS`` steps, so that long runs use larger, less noisy batches.
    - Learning rate: the brief LR times sqrt(k), Adam's square-root scaling rule for a k-times
      batch (Malladi et al. 2022), capped at 2x: the brief LR is already a high one for models of
      this size.
    - Warm-up: 2% of the steps, at least 100 and at most 2,000, never over 10% of the run.
    - Schedule: cosine from the peak to ``brief.min_lr_ratio`` of it, as the brief training
      (``nas.stages.train.lr_at``), AdamW with the brief run's betas, weight decay and clipping.

    ``tokens``, ``batch_size`` and ``lr`` given replace the suggestion (the rest is derived from
    them); ``train_tokens`` (the corpus's training split) adds how many epochs a budget is.
    """
    n = spec.params()
    T = spec.context_length
    budgets = {
        f"chinchilla_{CHINCHILLA_TOKENS_PER_PARAM}x": CHINCHILLA_TOKENS_PER_PARAM * n,
        **{f"overtrained_{k}x": k * n for k in OVERTRAINED_TOKENS_PER_PARAM},
    }
    if tokens is None:
        tokens = budgets[f"chinchilla_{CHINCHILLA_TOKENS_PER_PARAM}x"]
    if tokens <= 0:
        raise WinnerError(f"the token budget must be positive, got {tokens}")
    base_tokens = brief.batch_size * T
    k = 2 ** round(math.log2(max(1.0, tokens / (TARGET_STEPS * base_tokens))))
    k = int(min(MAX_BATCH_FACTOR, max(1, k)))
    if batch_size is None:
        batch_size = brief.batch_size * k
    if batch_size <= 0:
        raise WinnerError(f"the batch size must be positive, got {batch_size}")
    factor = batch_size / brief.batch_size
    lr_rule = "given"
    if lr is None:
        lr_rule = f"brief lr {brief.lr:g} x min(sqrt(batch growth {factor:g}), {MAX_LR_FACTOR:g})"
        lr = brief.lr * min(math.sqrt(factor), MAX_LR_FACTOR)
    if not (math.isfinite(lr) and lr > 0):
        raise WinnerError(f"the learning rate must be positive, got {lr}")
    steps = max(1, math.ceil(tokens / (batch_size * T)))
    warmup = min(max(100, round(0.02 * steps)), 2000, max(1, steps // 10))
    recipe: dict[str, Any] = {
        "params": n,
        "non_embedding_params": spec.non_embedding_params(),
        "token_budgets": budgets,
        "tokens": tokens,
        "tokens_per_param": tokens / n,
        "context_length": T,
        "batch_size": batch_size,
        "tokens_per_step": batch_size * T,
        "steps": steps,
        "lr": lr,
        "lr_rule": lr_rule,
        "warmup_steps": warmup,
        "schedule": "linear warm-up, then cosine decay to min_lr_ratio x lr (nas.stages.train.lr_at)",
        "min_lr_ratio": brief.min_lr_ratio,
        "optimizer": {"name": "AdamW", "betas": [brief.beta1, brief.beta2], "weight_decay": brief.weight_decay,
                      "decay": "matrices only", "grad_clip": brief.grad_clip},
        "eval_every": max(1, steps // 20),
        "eval_tokens": brief.eval_tokens,
        "checkpoint_every": max(1, steps // 20),
        "seed": brief.seed,
        "brief_training": brief.model_dump(),
    }
    if train_tokens:
        recipe["train_split_tokens"] = train_tokens
        recipe["epochs"] = tokens / train_tokens
        recipe["epochs_at_budgets"] = {k: v / train_tokens for k, v in budgets.items()}
    return recipe


# --- the export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinnerExport:
    """What ``export_winner`` wrote, and the manifest ``nas train`` reads back (``load_winner``)."""

    folder: Path
    spec: ArchSpec
    manifest: dict[str, Any]

    @property
    def study(self) -> str:
        return self.manifest["study"]

    @property
    def trial(self) -> int:
        return int(self.manifest["trial"])

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.manifest["tokenizer"]["file"]

    @property
    def hf_reasons(self) -> list[str]:
        """Why no Hugging Face folder was written; empty when it was."""
        return list(self.manifest["hf"]["not_expressible"])

    @property
    def brief_training(self) -> TrainConfig:
        return TrainConfig(**self.manifest["brief_training"])


def _tokenizer_cache_path(fingerprint: str, vocab_size: int) -> Path:
    from nas.stages.data import cache_dir

    # The layout of nas.stages.data's tokenizer cache (``_tokenizer_and_hash``): one file per
    # (corpus fingerprint, vocab size).
    return cache_dir() / "tokenizers" / f"{fingerprint}-{vocab_size}.json"


def study_corpus(study: StudyRow) -> Corpus:
    """The study's corpus rebuilt from its row, its fingerprint checked against the stored one."""
    from nas.stages.data import load_corpus

    extra = study.extra or {}
    data = extra.get("data") or "stdlib"
    max_bytes = extra.get("max_bytes")
    try:
        corpus = load_corpus(None if data == "stdlib" else data, max_bytes=max_bytes)
    except NasError as e:
        raise WinnerError(f"cannot rebuild study {study.name!r}'s corpus (data={data}, max_bytes={max_bytes}): {e}") \
            from None
    if study.corpus_fingerprint and corpus.fingerprint != study.corpus_fingerprint:
        raise WinnerError(f"study {study.name!r}'s corpus has changed since the search: data={data}, "
                          f"max_bytes={max_bytes} now has fingerprint {corpus.fingerprint}, the study "
                          f"{study.corpus_fingerprint}; its tokenizer and figures no longer match this data")
    return corpus


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare_out(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise WinnerError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise WinnerError(f"--out {out_dir}: folder is not empty; choose another one or pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("onnx", "hf", "litgpt"):  # replaced whole, so no stale file of another trial stays
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)


def export_winner(*, db_url: str, study: str, out_dir: Path, trial: int | None = None, pick: str | None = None,
                  max_decode_ms: float | None = None, force: bool = False,
                  notify: Callable[[str], None] | None = None) -> WinnerExport:
    """Pick a trial of ``study`` and write its export folder (module docstring). Reads the store
    only; the trial's artifacts are copied, never moved."""
    import torch

    from nas.stages.data import EOS, get_tokenizer, tokenize_corpus
    from nas.stages.export import load_exported
    from nas.stages.hf import (
        LITGPT_CONFIG,
        litgpt_config,
        litgpt_incompatibilities,
        litgpt_notes,
        llama_incompatibilities,
        save_hf,
    )
    from nas.stages.model import build_model
    from nas.store import Store

    say = notify or (lambda text: None)
    out_dir = Path(out_dir)
    with Store(db_url, upgrade=False) as store:
        st = store.get_study(name=study)
        chosen = pick_trial(store, study, trial=trial, pick=pick, max_decode_ms=max_decode_ms)
        row = store.get_trial(study=study, number=chosen.number)
        if row.arch_id is None:
            raise WinnerError(f"trial {row.number} of study {study!r} has no architecture recorded")
        spec = store.get_architecture(arch_id=row.arch_id).spec
        m = store.get_measurement(id=row.measurement_id) if row.measurement_id is not None else None
    say(f"trial {chosen.number}: {spec.summary()} ({chosen.how})")

    src = Path(row.artifact_dir) if row.artifact_dir else None
    if src is None or not (src / "model.pt").is_file() or not (src / "onnx").is_dir():
        raise WinnerError(f"trial {row.number}'s artifacts are missing: expected model.pt and onnx/ in "
                          f"{src or '(no artifact_dir recorded)'}; were they moved or deleted?")
    checkpoint = torch.load(src / "model.pt", map_location="cpu", weights_only=True)
    if ArchSpec.from_dict(checkpoint["spec"]) != spec:
        raise WinnerError(f"{src / 'model.pt'} holds another architecture than trial {row.number}'s {spec.arch_id}")

    say("rebuilding the study's corpus to find its tokenizer")
    corpus = study_corpus(st)
    tok_src = _tokenizer_cache_path(corpus.fingerprint, spec.vocab_size)
    if not tok_src.is_file():
        raise WinnerError(f"the tokenizer of corpus {corpus.fingerprint} at vocab {spec.vocab_size} is not in the "
                          f"cache ({tok_src}); run with NAS_CACHE_DIR set to the cache the search used")
    tok = get_tokenizer(corpus, spec.vocab_size)  # reads that very file: it exists
    if tok.get_vocab_size() != spec.vocab_size:
        raise WinnerError(f"{tok_src} has {tok.get_vocab_size()} tokens, the spec wants {spec.vocab_size}")
    train_tokens = len(tokenize_corpus(corpus, spec.vocab_size).train_ids)

    _prepare_out(out_dir, force)
    shutil.copy2(tok_src, out_dir / "tokenizer.json")
    shutil.copy2(src / "model.pt", out_dir / "model.pt")
    shutil.copytree(src / "onnx", out_dir / "onnx")
    deployed = load_exported(out_dir / "onnx")
    (out_dir / "arch.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    (out_dir / "arch.yaml").write_text(
        f"# {spec.summary()}  (arch_id {spec.arch_id}); ArchSpec fields, see nas/spec/arch.py\n"
        + yaml.safe_dump(spec.to_dict(), sort_keys=False))

    brief = TrainConfig(**(checkpoint.get("train_config") or st.train_config))
    recipe = suggest_recipe(spec, brief, train_tokens=train_tokens)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    hf_reasons = llama_incompatibilities(spec)
    if not hf_reasons:
        model = build_model(spec)
        model.load_state_dict(checkpoint["state_dict"])
        save_hf(model, out_dir / "hf", tokenizer_json=out_dir / "tokenizer.json", eos_token=EOS,
                eos_token_id=tok.token_to_id(EOS))
    lit_reasons = litgpt_incompatibilities(spec)
    if not lit_reasons:
        (out_dir / "litgpt").mkdir()
        (out_dir / "litgpt" / LITGPT_CONFIG).write_text(
            "# litgpt Config for " + spec.summary() + "\n# " + "\n# ".join(litgpt_notes(spec)) + "\n"
            + yaml.safe_dump(litgpt_config(spec), sort_keys=False))

    profile = _profile_budgets(st.profile)
    manifest = {
        "format": EXPORT_FORMAT,
        "study": study,
        "trial": row.number,
        "pick": {"how": chosen.how, **chosen.details},
        "arch_id": spec.arch_id,
        "summary": spec.summary(),
        "spec": spec.to_dict(),
        "params": spec.params(),
        "non_embedding_params": spec.non_embedding_params(),
        "study_objectives": [o.to_dict() for o in st.objectives],
        "space": st.space,
        "profile": profile,
        "corpus": {"data": (st.extra or {}).get("data") or "stdlib", "max_bytes": (st.extra or {}).get("max_bytes"),
                   "fingerprint": corpus.fingerprint, "train_bytes": corpus.train_bytes,
                   "val_bytes": corpus.val_bytes, "train_tokens": train_tokens},
        "tokenizer": {"file": "tokenizer.json", "vocab_size": spec.vocab_size, "eos_token": EOS,
                      "eos_token_id": tok.token_to_id(EOS), "sha256": _sha256(out_dir / "tokenizer.json")},
        "brief_training": brief.model_dump(),
        "brief_result": row.train,
        "val_bpb": row.val_bpb,
        "baselines": row.baselines,
        "objectives": row.objectives,
        "constraints": row.constraints,
        "feasible": row.feasible,
        "measurement": _measurement_dict(m),
        "onnx": {"dir": "onnx", "bitwidth": deployed.bitwidth, "total_bytes": deployed.total_bytes,
                 "tied_storage": deployed.tied_storage, "quantized_ops": list(deployed.quantized_ops),
                 "embedding_quantized": deployed.embedding_quantized, "lm_head_quantized": deployed.lm_head_quantized,
                 "opset": deployed.opset},
        "hf": {"dir": "hf" if not hf_reasons else None, "not_expressible": hf_reasons},
        "litgpt": {"dir": "litgpt" if not lit_reasons else None, "not_expressible": lit_reasons},
        "source": {"artifact_dir": str(src), "code_version": st.code_version},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (out_dir / "README.md").write_text(render_readme(manifest, recipe))
    return WinnerExport(out_dir, spec, manifest)


def load_winner(folder: Path) -> WinnerExport:
    """An export folder written by :func:`export_winner`, checked for the files ``nas train`` needs."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise WinnerError(f"{folder}: not an export folder (no {MANIFEST}); make one with `nas export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WinnerError(f"{path}: cannot read: {e}") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise WinnerError(f"{path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    spec = ArchSpec.from_dict(manifest["spec"])
    export = WinnerExport(folder, spec, manifest)
    for needed in (export.tokenizer_path, folder / "model.pt"):
        if not needed.is_file():
            raise WinnerError(f"{folder}: {needed.name} is missing; export the trial again")
    return export


def _profile_budgets(name: str) -> dict[str, Any]:
    from nas.spec.profile import load_profile

    try:
        p = load_profile(name)
    except NasError as e:
        return {"name": name, "device": None, "budgets": None, "error": str(e)}
    b = p.budgets
    return {"name": name, "device": p.device.name, "where": p.measurement.where,
            "execution_provider": p.runtime.execution_provider, "threads": p.runtime.threads,
            "workload": p.workload.model_dump(),
            "budgets": {"peak_memory_mb": b.peak_memory_mb, "decode_ms_per_token": b.decode_ms_per_token,
                        "prefill_ms": b.prefill_ms, "model_mb": b.model_mb}}


def _measurement_dict(m: Any) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"id": m.id, "label": m.label, "profile": m.profile, "bitwidth": m.bitwidth,
            "decode_ms": m.decode_ms_per_token, "decode_p10_ms": m.decode_p10_ms, "decode_p90_ms": m.decode_p90_ms,
            "prefill_ms": m.prefill_ms, "prefill_p10_ms": m.prefill_p10_ms, "prefill_p90_ms": m.prefill_p90_ms,
            "peak_memory_bytes": m.peak_memory_bytes, "model_bytes": m.model_bytes, "workload": m.workload,
            "provenance": m.provenance, "created_at": m.created_at.isoformat()}


# --- README -------------------------------------------------------------------------------------


def _f(value: Any, fmt: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{fmt}}{unit}"


def render_readme(manifest: dict[str, Any], recipe: dict[str, Any]) -> str:
    """The export's README: figures with their labels and sources, the deployment files, the
    ecosystem configs and what they cannot express, and the full-training recipe in prose."""
    spec = ArchSpec.from_dict(manifest["spec"])
    m = manifest["measurement"] or {}
    prof = manifest["profile"]
    base = manifest["baselines"] or {}
    brief = manifest["brief_training"]
    br = manifest["brief_result"] or {}
    onnx = manifest["onnx"]
    label = m.get("label", "n/a")
    prov = (m.get("provenance") or {})
    host = prov.get("host", prov)
    w = m.get("workload") or {}
    budgets = (prof.get("budgets") or {})
    lines = [
        f"# {spec.summary()}",
        "",
        f"Trial {manifest['trial']} of study `{manifest['study']}` (space `{manifest['space']}`, profile "
        f"`{prof['name']}`), exported by `nas export`. Picked as: {manifest['pick']['how']}.",
        "",
        f"- arch_id `{spec.arch_id}`; {spec.params():,} parameters ({spec.non_embedding_params():,} non-embedding); "
        f"weights {spec.weight_bytes() / MIB:.2f} MiB at {spec.bitwidth} bits (analytic); KV cache "
        f"{spec.kv_cache_bytes_per_token():,} bytes per token.",
        "",
        "## Figures",
        "",
        "| figure | value | where it comes from |",
        "|---|---|---|",
        f"| validation BPB | **{_f(manifest['val_bpb'], '.4f')}** | the quantized ONNX model "
        f"({onnx['bitwidth']}-bit) in ONNX Runtime, first {brief['eval_tokens']:,} validation targets of the "
        "study's corpus |",
        f"| bigram baseline BPB | {_f(base.get('bigram_bpb'), '.4f')} | Kneser-Ney bigram counts of the same tokenizer "
        "(what counting alone achieves) |",
        f"| unigram baseline BPB | {_f(base.get('unigram_bpb'), '.4f')} | add-one unigram of the same tokenizer |",
        f"| decode | {_f(m.get('decode_ms'), '.4g', ' ms/token')} (p10 {_f(m.get('decode_p10_ms'), '.4g')}, p90 "
        f"{_f(m.get('decode_p90_ms'), '.4g')}) | `{label}`, one step with {w.get('context_tokens', '?')} tokens "
        f"cached, batch {w.get('batch', '?')} |",
        f"| prefill | {_f(m.get('prefill_ms'), '.4g', ' ms')} (p10 {_f(m.get('prefill_p10_ms'), '.4g')}, p90 "
        f"{_f(m.get('prefill_p90_ms'), '.4g')}) | `{label}`, a prompt of {w.get('prompt_tokens', '?')} tokens |",
        f"| peak memory | {_f((m.get('peak_memory_bytes') or 0) / MIB if m else None, '.1f', ' MiB')} | `{label}`, "
        "VmHWM of the inference process, runtime included |",
        f"| model size | {_f((m.get('model_bytes') or 0) / MIB if m else None, '.2f', ' MiB')} measured; this "
        f"folder's onnx/ {onnx['total_bytes'] / MIB:.2f} MiB | the .onnx and its external data |",
        "",
        f"Taken on: {host.get('cpu', '?')}, {host.get('threads', '?')} threads, "
        f"{host.get('execution_provider', '?')}, onnxruntime {host.get('onnxruntime', '?')}; "
        f"{w.get('warmup', '?')} warm-up runs, median of up to {w.get('repeats', '?')} repeats.",
    ]
    if label.startswith("estimated"):
        lines.append("These latencies are **estimated** (the host's measurement scaled by the roofline model to the "
                     "profile's device), not measured on it.")
    lines += [
        "Latency was measured on the same graph with freshly initialized weights before training (latency does "
        "not depend on the weights' values); BPB was scored on the trained, quantized file in `onnx/`.",
        f"BPB is after a brief training ({br.get('tokens', brief['tokens']):,} tokens, {br.get('steps', '?')} steps): "
        "at such budgets a second seed moves BPB by up to ~0.1 (NOTES.md), so small gaps between trials are "
        "noise; the full training below is what tells.",
        "",
        f"### Profile `{prof['name']}` and its budgets",
        "",
        f"Device: {prof.get('device') or 'unknown'}"
        + {"local": "; figures measured on the machine that runs the search",
           "ray": "; figures measured on a Ray node with the device, else estimated",
           "estimate": "; figures estimated by the roofline model"}.get(prof.get("where") or "", "") + ".",
    ]
    if prof.get("error"):
        lines.append(f"(The profile could not be read now: {prof['error']}.)")
    constraints = manifest.get("constraints") or {}
    names = {"peak_memory_mb": "peak memory (MiB)", "decode_ms_per_token": "decode (ms/token)",
             "prefill_ms": "prefill (ms)", "model_mb": "model size (MiB)"}
    rows = [(names[k], v, constraints.get(k)) for k, v in budgets.items() if v is not None]
    if rows:
        lines += ["", "| budget | limit | margin (figure - limit; <= 0 is within) |", "|---|---|---|"]
        lines += [f"| {n} | {lim:g} | {_f(c, '+.4g')} |" for n, lim, c in rows]
    lines += ["", f"Within every budget: {'yes' if manifest['feasible'] else '**no**'}.", ""]

    lines += [
        "## Files",
        "",
        "- `arch.json`, `arch.yaml`: the ArchSpec (`ArchSpec.from_json(open('arch.json').read())`).",
        f"- `tokenizer.json`: byte-level BPE, {spec.vocab_size} tokens, trained on the study's corpus "
        f"(`{manifest['corpus']['data']}`, max_bytes {manifest['corpus']['max_bytes']}, fingerprint "
        f"`{manifest['corpus']['fingerprint']}`); documents end with `{manifest['tokenizer']['eos_token']}` "
        f"(id {manifest['tokenizer']['eos_token_id']}), nothing is prepended.",
        "- `model.pt`: the trained weights, `{\"spec\", \"state_dict\", \"train_config\"}`; "
        "`nas.stages.model.build_model(spec).load_state_dict(...)`.",
        f"- `onnx/`: the deployed model, {onnx['bitwidth']}-bit (`model.onnx` + `model.onnx.data`, `model.json` "
        "describes the inputs: `input_ids`, `past.{i}.*` -> `logits`, `present.{i}.*`)"
        + ("; `onnx/fp32/` is its fp32 source." if onnx["bitwidth"] != 32 else ".")
        + (" The tied embedding is stored twice in the file (table and lm_head), as measured."
           if onnx["tied_storage"] == "duplicated" else ""),
        "- `recipe.json`: the full-training plan below; `export.json`: this export's manifest.",
        "",
        "## Ecosystem configs",
        "",
    ]
    hf = manifest["hf"]
    if hf["dir"]:
        kind = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA"}[spec.attention]
        lines += [
            f"- `hf/`: Hugging Face `LlamaForCausalLM` ({kind}: {spec.n_heads} heads, {spec.n_kv_heads} KV heads of "
            f"{spec.head_dim}), fp32 `model.safetensors` of the trained weights, `config.json`, and the tokenizer "
            "(`AutoTokenizer`). `LlamaForCausalLM.from_pretrained('hf')` computes the same logits as `model.pt` "
            "(tests/test_export_winner.py). The spec's bitwidth applies to the ONNX deployment, not to this folder; "
            "onnxruntime-genai's model builder turns it into a fused int4/int8 graph (NOTES.md).",
        ]
    else:
        lines += ["- Hugging Face: **not written** — `LlamaConfig` cannot express this architecture:"]
        lines += [f"  - {r}" for r in hf["not_expressible"]]
        lines += ["  A Llama config would load but compute another function, so none is given; use `model.pt` with "
                  "`nas.stages.model`, or `onnx/`."]
    lit = manifest["litgpt"]
    if lit["dir"]:
        lines.append("- `litgpt/model_config.yaml`: litgpt `Config` fields (config only; read its header).")
    else:
        lines += ["- litgpt: not written —"] + [f"  - {r}" for r in lit["not_expressible"]]

    r = recipe
    budgets_txt = ", ".join(f"{k.replace('_', ' ')}: {v:,} tokens" for k, v in r["token_budgets"].items())
    epochs = ""
    if r.get("train_split_tokens"):
        epochs = (f" The study's corpus has {r['train_split_tokens']:,} training tokens at this vocabulary, so the "
                  f"suggested budget is {r['epochs']:.1f} epochs of it"
                  + (f"; past {MAX_SUBSET_EPOCHS} epochs repeated data overfits, so `nas train` uses the whole "
                     "source instead of the study's subset (`--max-bytes` keeps a subset, `--data` takes other "
                     "text)." if r["epochs"] > MAX_SUBSET_EPOCHS and manifest["corpus"]["max_bytes"] else
                     f"; past {MAX_SUBSET_EPOCHS} epochs repeated data overfits: give `nas train --data` more text."
                     if r["epochs"] > MAX_SUBSET_EPOCHS else "."))
    lines += [
        "",
        "## Training it fully",
        "",
        "```",
        "nas train .            # from this folder; run the same command again to resume after an interruption",
        "```",
        "",
        f"Token budget: Chinchilla's compute-optimal ~{CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter gives "
        f"**{r['tokens']:,} tokens** ({r['params']:,} params), the default. Small models meant for deployment are "
        "trained well past that point, since what they save is inference, not training: 100-1,000+ tokens per "
        "parameter (TinyLlama 1.1B saw 3T tokens, ~2,700 per parameter; Llama 3 8B 15T, ~1,900). "
        f"Budgets: {budgets_txt}.{epochs}",
        "",
        f"Batch: {r['batch_size']} sequences of {r['context_length']} tokens ({r['tokens_per_step']:,} tokens per "
        f"step, {r['steps']:,} steps), the brief run's {brief['batch_size']} grown by a power of two (at most "
        f"{MAX_BATCH_FACTOR}x) until the budget takes about {TARGET_STEPS:,} steps. "
        f"Learning rate: peak {r['lr']:.3g}, the brief run's {brief['lr']:g} scaled by the square root of the batch "
        f"growth (Adam's square-root rule), capped at {MAX_LR_FACTOR:g}x. Warm-up {r['warmup_steps']:,} steps "
        f"(2% of the run, 100-2,000), then cosine decay to {r['min_lr_ratio']:g}x the peak; AdamW "
        f"(betas {r['optimizer']['betas']}, weight decay {r['optimizer']['weight_decay']:g} on matrices), gradient "
        f"clipping {r['optimizer']['grad_clip']:g}: the brief training's optimizer, run longer. Validation BPB every "
        f"{r['eval_every']:,} steps, a checkpoint every {r['checkpoint_every']:,}.",
        "",
        "`nas train` starts from scratch by default (the brief run's seed, so the same initial weights): the brief "
        "weights saw a negligible share of the budget on an already-decayed schedule; `--init exported` starts "
        "from them instead. `--tokens`, `--batch-size`, `--lr` override the plan; the rest is derived again.",
        "",
    ]
    return "\n".join(lines)
