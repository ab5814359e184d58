"""`nas studies`, `nas pareto`, `nas show`, `nas db upgrade`: read results from the store.
Registered on the main app by ``register(app)``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from nas.faces.cli.common import (
    DbOpt,
    JsonOpt,
    console,
    db_url,
    fmt_count,
)


def register(app: typer.Typer) -> None:
    """Add ``studies``, ``pareto``, ``show`` to ``app``."""
    app.command()(studies)
    app.command()(pareto)
    app.command()(show)
    app.add_typer(db_app, name="db")


def _trial_figures(store, trial) -> dict:
    m = store.get_measurement(id=trial.measurement_id).summary() if trial.measurement_id else {}
    base = trial.baselines or {}
    return {
        "number": trial.number, "state": trial.state, "arch_id": trial.arch_id, "architecture": trial.arch_summary,
        "params": store.get_architecture(arch_id=trial.arch_id).params if trial.arch_id else None,
        "val_bpb": trial.val_bpb, "objectives": trial.objectives, "constraints": trial.constraints,
        # how long the model behind val_bpb was trained: with rungs, trials stop at different budgets
        "bpb_tokens": (trial.train or {}).get("tokens"), "rung": (trial.train or {}).get("rung"),
        "feasible": {"complete": trial.feasible, "infeasible": False}.get(trial.state),
        "label": m.get("label"), "fingerprint": _fingerprint(m), "decode_ms": m.get("decode_ms"),
        "prefill_ms": m.get("prefill_ms"),
        "peak_memory_mb": m.get("peak_memory_mb"), "model_mb": m.get("model_mb"),
        "failed_stage": trial.failed_stage, "failure_reason": trial.failure_reason,
        "seconds": trial.seconds, "artifact_dir": trial.artifact_dir,
        # what counting alone achieves with the trial's own tokenizer, on the same validation text
        "bigram_bpb": base.get("bigram_bpb"), "unigram_bpb": base.get("unigram_bpb"),
        "beats_bigram": trial.beats_bigram,
    }


def _fingerprint(summary: dict) -> str | None:
    prov = summary.get("provenance") or {}
    return prov.get("fingerprint") or (prov.get("host") or {}).get("fingerprint")


def _newer(store, trial) -> dict | None:
    """A measurement of the trial's architecture taken after the one it was scored with."""
    if not trial.measurement_id:
        return None
    row = store.newer_measurement(id=trial.measurement_id)
    if row is None:
        return None
    return {"id": row.id, "label": row.label, "fingerprint": row.fingerprint, "decode_ms": row.decode_ms_per_token,
            "prefill_ms": row.prefill_ms, "created_at": row.created_at.isoformat(timespec="seconds")}


def _open_store(db: str):
    from nas.store import Store

    return Store(db, upgrade=False)


def print_pareto(db: str, study: str, as_json: bool) -> None:
    with _open_store(db) as store:
        st = store.get_study(name=study)
        front = store.pareto(study=study)
        rows = [_trial_figures(store, t) for t in front]
        for r, t in zip(rows, front, strict=True):
            r["newer_measurement"] = _newer(store, t)
        noise = store.noise(study=study)
    close = noise.within({r["number"]: r["val_bpb"] for r in rows if r["val_bpb"] is not None}) if noise else {}
    for r in rows:
        r["within_noise_of"] = close.get(r["number"], [])
    if as_json:
        print(json.dumps({"study": study, "objectives": [o.to_dict() for o in st.objectives], "front": rows,
                          "noise": noise.to_dict() if noise else None}, indent=2, default=str))
        return
    table = Table(title=f"Pareto front of {study}: {len(rows)} of {st.n_trials} trials "
                        f"({st.space} on {st.profile})",
                  caption="objectives: " + ", ".join(f"{o.name} ({o.direction})" for o in st.objectives)
                  + "; latency and memory labelled with where they came from")
    rungs = int((st.extra.get("rungs") or {}).get("count", 1))
    if rungs > 1:
        table.caption += ("; BPB @ the tokens the trial was trained (rungs: a trial stopped early is compared "
                          "with the others at the budget both reached)")
    if noise is not None and noise.std is not None:
        table.caption += (f"; BPB ± {noise.std:.4f}: the seed spread ({len(noise.seeds)} seeds of trial "
                          f"{noise.trial_number}'s architecture at {noise.tokens:,} tokens); ≈: the front trials whose "
                          f"BPB differs from this one's by less than {noise.NOISE_GAP:g} × that spread (within "
                          "noise: BPB does not order them)")
    if any(r["beats_bigram"] is False for r in rows):
        table.caption += "; [red]≥ bigram[/red]: BPB not below the bigram baseline of its own tokenizer"
    for col in ("#", "architecture", "params", "BPB", "≈", "bigram", "unigram", "decode ms/tok", "prefill ms",
                "memory MiB", "size MiB", "label"):
        table.add_column(col, justify="left" if col in ("architecture", "label") else "right", overflow="fold")
    for r in sorted(rows, key=lambda r: (r["val_bpb"] is None, r["val_bpb"])):
        table.add_row(str(r["number"]), r["architecture"] or "", fmt_count(r["params"] or 0),
                      _bpb_cell(r, rungs), " ".join(f"#{n}" for n in r["within_noise_of"]),
                      f"{r['bigram_bpb']:.3f}" if r["bigram_bpb"] is not None else "",
                      f"{r['unigram_bpb']:.3f}" if r["unigram_bpb"] is not None else "",
                      f"{r['decode_ms']:.3f}" if r["decode_ms"] is not None else "",
                      f"{r['prefill_ms']:.2f}" if r["prefill_ms"] is not None else "",
                      f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "",
                      f"{r['model_mb']:.1f}" if r["model_mb"] is not None else "", r["label"] or "")
    console.print(table)
    for r in rows:  # re-measurements: shown beside the trial's figures, which stay as it was scored
        n = r["newer_measurement"]
        if n:
            console.print(f"  #{r['number']} measured again {n['created_at']}: decode {n['decode_ms']:.3f} ms/tok, "
                          f"prefill {n['prefill_ms']:.2f} ms, {n['label']} (fingerprint {n['fingerprint']}); the "
                          f"row above is what the trial was scored with", highlight=False)


def _bpb_cell(row: dict, rungs: int) -> str:
    if row["val_bpb"] is None:
        return ""
    text = f"{row['val_bpb']:.4f}"
    if rungs > 1 and row.get("bpb_tokens"):
        text += f" @{fmt_count(row['bpb_tokens'])}"
    if row.get("beats_bigram") is False:
        text += " [red]≥ bigram[/red]"
    return text


def studies(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies in the database with their trials by state."""
    with _open_store(db_url(db)) as store:
        rows = store.list_studies()
        fronts = {s.name: len(store.pareto(study=s.name)) for s in rows}
    if as_json:
        print(json.dumps([{"name": s.name, "space": s.space, "profile": s.profile, "trials": s.trial_counts,
                           "front": fronts[s.name], "objectives": [o.to_dict() for o in s.objectives],
                           "created_at": s.created_at.isoformat(), "code_version": s.code_version} for s in rows],
                         indent=2))
        return
    table = Table(title=f"Studies in {db_url(db)}")
    for col in ("study", "space", "device", "complete", "infeasible", "failed", "running", "front", "created"):
        table.add_column(col)
    for s in rows:
        c = s.trial_counts
        table.add_row(s.name, s.space, s.profile, str(c.get("complete", 0)), str(c.get("infeasible", 0)),
                      str(c.get("failed", 0)), str(c.get("running", 0)), str(fronts[s.name]),
                      s.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


def pareto(study: Annotated[str, typer.Argument(help="Study name (see `nas studies`).")], db: DbOpt = None,
           as_json: JsonOpt = False) -> None:
    """The study's Pareto front: architecture, params, BPB, latencies with their labels, memory, size."""
    print_pareto(db_url(db), study, as_json)


def show(study: Annotated[str, typer.Argument(help="Study name.")],
         trial: Annotated[int, typer.Argument(help="Trial number.")], db: DbOpt = None,
         as_json: JsonOpt = False) -> None:
    """One trial: its spec, measurement with provenance, training, score, and why it failed if it did."""
    with _open_store(db_url(db)) as store:
        t = store.get_trial(study=study, number=trial)
        figures = _trial_figures(store, t)
        spec = store.get_architecture(arch_id=t.arch_id).spec if t.arch_id else None
        m = store.get_measurement(id=t.measurement_id) if t.measurement_id else None
        full = store.trials(study=study, curves=True)
    curve = next((x.curve for x in full if x.number == trial), None)
    if as_json:
        print(json.dumps({**figures, "spec": spec.to_dict() if spec else None, "train": t.train,
                          "baselines": t.baselines, "curve": curve,
                          "measurement": {"workload": m.workload, "provenance": m.provenance,
                                          "decode_p10_ms": m.decode_p10_ms, "decode_p90_ms": m.decode_p90_ms,
                                          "prefill_p10_ms": m.prefill_p10_ms, "prefill_p90_ms": m.prefill_p90_ms}
                          if m else None}, indent=2, default=str))
        return
    table = Table(title=f"{study} trial {trial}: {t.state}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    if t.failure_reason:
        table.add_row("why", f"[red]{t.failed_stage}: {t.failure_reason}[/red]")
    if spec:
        table.add_row("architecture", f"{spec.summary()} ({spec.arch_id})")
        table.add_row("params", f"{spec.params():,} ({spec.non_embedding_params():,} non-embedding)")
    if t.val_bpb is not None:
        b = t.baselines or {}
        table.add_row("validation BPB", f"{t.val_bpb:.4f} (bigram {b.get('bigram_bpb', float('nan')):.4f}, "
                                        f"unigram {b.get('unigram_bpb', float('nan')):.4f})")
    if t.train:
        tr = t.train
        table.add_row("training", f"{tr['tokens']:,} tokens, {tr['steps']} steps, {tr['seconds']} s "
                                  f"({tr['tokens_per_s']:,.0f} tok/s), final loss {tr['final_loss']:.4f}")
    if curve:
        table.add_row("loss curve", "  ".join(f"{p[0]}:{p[2]:.2f}" for p in curve[:: max(1, len(curve) // 8)]))
    if m and m.ok:
        f = m.summary()
        table.add_row("decode", f"{f['decode_ms']:.3f} ms/token (p10 {f['decode_p10_ms']:.3f}, p90 "
                                f"{f['decode_p90_ms']:.3f}) {m.label}")
        table.add_row("prefill", f"{f['prefill_ms']:.2f} ms (p10 {f['prefill_p10_ms']:.2f}, p90 "
                                 f"{f['prefill_p90_ms']:.2f}) {m.label}")
        peak = "not measured" if f["peak_memory_mb"] is None else f"{f['peak_memory_mb']:.1f} MiB peak"
        table.add_row("memory / size", f"{peak}, {f['model_mb']:.2f} MiB model")
        table.add_row("workload", json.dumps(m.workload))
        prov = m.provenance.get("host", m.provenance)
        table.add_row("taken on", f"{prov.get('cpu')}, {prov.get('threads')} threads, "
                                  f"{prov.get('execution_provider')}, onnxruntime {prov.get('onnxruntime')}")
    if t.constraints:
        table.add_row("constraints", ", ".join(f"{k} {v:+.3g}" for k, v in t.constraints.items())
                      + ("  (≤ 0 is within budget)"))
    if t.artifact_dir:
        table.add_row("artifacts", t.artifact_dir)
    console.print(table)


db_app = typer.Typer(help="The results database.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None) -> None:
    """Create or upgrade this project's tables (nas_*) to the current schema. Optuna's tables are
    Optuna's own and untouched."""
    from nas.store import upgrade

    before, after = upgrade(db_url(db))
    console.print(f"{db_url(db)}: schema {before or 'empty'} -> {after}")
