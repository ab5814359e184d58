"""The winner of a study as a folder: one folder with everything needed to deploy it or train it fully.

``nas export STUDY --trial N | --pick knee | --pick best-under --max-decode-ms X --out DIR``
chooses a trial (``nas.winner.pick``), then writes::

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

The recipe is ``nas.winner.recipe``'s, the README ``nas.winner.readme``'s; :func:`load_winner`
reads the folder back for ``nas train``.

The tokenizer is not stored with a trial: it is the cached BPE of the study's corpus for the
spec's vocabulary. The corpus is rebuilt from the study row (``extra.data``, ``extra.max_bytes``),
its fingerprint checked against the study's, and the cached file copied; a missing cache entry
is an error naming the ``NAS_CACHE_DIR`` the search must have used, never a silently retrained
(and possibly different) tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.profile import load_profile
from nas.spec.settings import TrainConfig
from nas.winner.errors import WinnerError
from nas.winner.pick import Pick, pick_trial
from nas.winner.readme import render_readme
from nas.winner.recipe import suggest_recipe

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from nas.stages.data import Corpus
    from nas.stages.export import ExportedModel
    from nas.store import MeasurementRow, StudyRow, TrialRow

EXPORT_FORMAT = "nas-export-v1"
MANIFEST = "export.json"


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


# --- writing the folder, in the order export_winner takes the steps -----------------------------


@dataclass(frozen=True)
class _Chosen:
    """The picked trial and what the store holds about it."""

    study: StudyRow
    pick: Pick
    row: TrialRow
    spec: ArchSpec
    measurement: MeasurementRow | None


def export_winner(*, db_url: str, study: str, out_dir: Path, trial: int | None = None, pick: str | None = None,
                  max_decode_ms: float | None = None, force: bool = False,
                  notify: Callable[[str], None] | None = None) -> WinnerExport:
    """Pick a trial of ``study`` and write its export folder (module docstring). Reads the store
    only; the trial's artifacts are copied, never moved. Everything that can refuse the export is
    checked before ``out_dir`` is touched."""
    from nas.stages.data import tokenize_corpus

    say = notify or (lambda text: None)
    out_dir = Path(out_dir)
    chosen = _choose(db_url, study, trial=trial, pick=pick, max_decode_ms=max_decode_ms)
    spec = chosen.spec
    say(f"trial {chosen.pick.number}: {spec.summary()} ({chosen.pick.how})")
    src, checkpoint = _trained_artifacts(chosen)
    say("rebuilding the study's corpus to find its tokenizer")
    corpus = study_corpus(chosen.study)
    tok_src, tok = _cached_tokenizer(corpus, spec)
    train_tokens = len(tokenize_corpus(corpus, spec.vocab_size).train_ids)

    _prepare_out(out_dir, force)
    deployed = _copy_trial_files(out_dir, src, tok_src, spec)
    brief = TrainConfig(**(checkpoint.get("train_config") or chosen.study.train_config))
    recipe = suggest_recipe(spec, brief, train_tokens=train_tokens)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    hf_reasons = _write_hf(out_dir, spec, checkpoint, tok)
    lit_reasons = _write_litgpt(out_dir, spec)

    manifest = _manifest(chosen, src=src, out_dir=out_dir, corpus=corpus, train_tokens=train_tokens, tok=tok,
                         brief=brief, deployed=deployed, hf_reasons=hf_reasons, lit_reasons=lit_reasons)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (out_dir / "README.md").write_text(render_readme(manifest, recipe))
    return WinnerExport(out_dir, spec, manifest)


def _choose(db_url: str, study: str, *, trial: int | None, pick: str | None, max_decode_ms: float | None,
            ) -> _Chosen:
    from nas.store import Store

    with Store(db_url, upgrade=False) as store:
        st = store.get_study(name=study)
        chosen = pick_trial(store, study, trial=trial, pick=pick, max_decode_ms=max_decode_ms)
        row = store.get_trial(study=study, number=chosen.number)
        if row.arch_id is None:
            raise WinnerError(f"trial {row.number} of study {study!r} has no architecture recorded")
        spec = store.get_architecture(arch_id=row.arch_id).spec
        m = store.get_measurement(id=row.measurement_id) if row.measurement_id is not None else None
    return _Chosen(st, chosen, row, spec, m)


def _trained_artifacts(chosen: _Chosen) -> tuple[Path, dict[str, Any]]:
    """The trial's artifact folder and its checkpoint, which must hold the trial's architecture."""
    import torch

    row = chosen.row
    src = Path(row.artifact_dir) if row.artifact_dir else None
    if src is None or not (src / "model.pt").is_file() or not (src / "onnx").is_dir():
        raise WinnerError(f"trial {row.number}'s artifacts are missing: expected model.pt and onnx/ in "
                          f"{src or '(no artifact_dir recorded)'}; were they moved or deleted?")
    checkpoint = torch.load(src / "model.pt", map_location="cpu", weights_only=True)
    if ArchSpec.from_dict(checkpoint["spec"]) != chosen.spec:
        raise WinnerError(f"{src / 'model.pt'} holds another architecture than trial {row.number}'s "
                          f"{chosen.spec.arch_id}")
    return src, checkpoint


def _tokenizer_cache_path(fingerprint: str, vocab_size: int) -> Path:
    from nas.stages.data import cache_dir

    # The layout of nas.stages.data's tokenizer cache (``_tokenizer_and_hash``): one file per
    # (corpus fingerprint, vocab size).
    return cache_dir() / "tokenizers" / f"{fingerprint}-{vocab_size}.json"


def _cached_tokenizer(corpus: Corpus, spec: ArchSpec) -> tuple[Path, Tokenizer]:
    """The cached file of the trial's tokenizer and the tokenizer; never a retrained one (module docstring)."""
    from nas.stages.data import get_tokenizer

    path = _tokenizer_cache_path(corpus.fingerprint, spec.vocab_size)
    if not path.is_file():
        raise WinnerError(f"the tokenizer of corpus {corpus.fingerprint} at vocab {spec.vocab_size} is not in the "
                          f"cache ({path}); run with NAS_CACHE_DIR set to the cache the search used")
    tok = get_tokenizer(corpus, spec.vocab_size)  # reads that very file: it exists
    if tok.get_vocab_size() != spec.vocab_size:
        raise WinnerError(f"{path} has {tok.get_vocab_size()} tokens, the spec wants {spec.vocab_size}")
    return path, tok


def _prepare_out(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise WinnerError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise WinnerError(f"--out {out_dir}: folder is not empty; choose another one or pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("onnx", "hf", "litgpt"):  # replaced whole, so no stale file of another trial stays
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)


def _copy_trial_files(out_dir: Path, src: Path, tok_src: Path, spec: ArchSpec) -> ExportedModel:
    """Tokenizer, weights and the scored ONNX model copied; the spec written as JSON and YAML."""
    from nas.stages.export import load_exported

    shutil.copy2(tok_src, out_dir / "tokenizer.json")
    shutil.copy2(src / "model.pt", out_dir / "model.pt")
    shutil.copytree(src / "onnx", out_dir / "onnx")
    (out_dir / "arch.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    (out_dir / "arch.yaml").write_text(
        f"# {spec.summary()}  (arch_id {spec.arch_id}); ArchSpec fields, see nas/spec/arch.py\n"
        + yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return load_exported(out_dir / "onnx")


def _write_hf(out_dir: Path, spec: ArchSpec, checkpoint: dict[str, Any], tok: Tokenizer) -> list[str]:
    """``hf/`` where Llama can express the spec; the reasons it cannot (empty when written)."""
    from nas.stages.data import EOS
    from nas.stages.hf import llama_incompatibilities, save_hf
    from nas.stages.model import build_model

    reasons = llama_incompatibilities(spec)
    if not reasons:
        model = build_model(spec)
        model.load_state_dict(checkpoint["state_dict"])
        save_hf(model, out_dir / "hf", tokenizer_json=out_dir / "tokenizer.json", eos_token=EOS,
                eos_token_id=tok.token_to_id(EOS))
    return reasons


def _write_litgpt(out_dir: Path, spec: ArchSpec) -> list[str]:
    """``litgpt/`` where litgpt can express the spec; the reasons it cannot (empty when written)."""
    from nas.stages.hf import LITGPT_CONFIG, litgpt_config, litgpt_incompatibilities, litgpt_notes

    reasons = litgpt_incompatibilities(spec)
    if not reasons:
        (out_dir / "litgpt").mkdir()
        (out_dir / "litgpt" / LITGPT_CONFIG).write_text(
            "# litgpt Config for " + spec.summary() + "\n# " + "\n# ".join(litgpt_notes(spec)) + "\n"
            + yaml.safe_dump(litgpt_config(spec), sort_keys=False))
    return reasons


def _manifest(chosen: _Chosen, *, src: Path, out_dir: Path, corpus: Corpus, train_tokens: int, tok: Tokenizer,
              brief: TrainConfig, deployed: ExportedModel, hf_reasons: list[str],
              lit_reasons: list[str]) -> dict[str, Any]:
    """``export.json``: what ``nas train`` and the README read. Its keys are the format
    ``EXPORT_FORMAT`` names, which ``load_winner`` checks: a change to them is a new format."""
    from nas.stages.data import EOS

    st, row, spec = chosen.study, chosen.row, chosen.spec
    extra = st.extra or {}
    return {
        "format": EXPORT_FORMAT,
        "study": st.name,
        "trial": row.number,
        "pick": {"how": chosen.pick.how, **chosen.pick.details},
        "arch_id": spec.arch_id,
        "summary": spec.summary(),
        "spec": spec.to_dict(),
        "params": spec.params(),
        "non_embedding_params": spec.non_embedding_params(),
        "study_objectives": [o.to_dict() for o in st.objectives],
        "space": st.space,
        "profile": _profile_budgets(st.profile),
        "corpus": {"data": extra.get("data") or "stdlib", "max_bytes": extra.get("max_bytes"),
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
        "measurement": _measurement_dict(chosen.measurement),
        "onnx": {"dir": "onnx", "bitwidth": deployed.bitwidth, "total_bytes": deployed.total_bytes,
                 "tied_storage": deployed.tied_storage, "quantized_ops": list(deployed.quantized_ops),
                 "embedding_quantized": deployed.embedding_quantized, "lm_head_quantized": deployed.lm_head_quantized,
                 "opset": deployed.opset},
        "hf": {"dir": "hf" if not hf_reasons else None, "not_expressible": hf_reasons},
        "litgpt": {"dir": "litgpt" if not lit_reasons else None, "not_expressible": lit_reasons},
        "source": {"artifact_dir": str(src), "code_version": st.code_version},
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _profile_budgets(name: str) -> dict[str, Any]:
    """The study's profile as it reads now (a profile edited since the search shows its new
    budgets); one that no longer loads is named, with why, rather than failing the export."""
    try:
        p = load_profile(name)
    except NasError as e:
        return {"name": name, "device": None, "budgets": None, "error": str(e)}
    return {"name": name, "device": p.device.name, "where": p.measurement.where,
            "execution_provider": p.runtime.execution_provider, "threads": p.runtime.threads,
            "workload": p.workload.model_dump(), "budgets": p.budgets.model_dump()}


def _measurement_dict(m: MeasurementRow | None) -> dict[str, Any] | None:
    return None if m is None else m.summary()
