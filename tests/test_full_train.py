"""`nas train`: the exported winner of a real tiny search trained fully, stopped, resumed on the
same curve as an uninterrupted run, and exported to a runnable ONNX file at its bitwidth."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nas.stages.data import WindowSampler, train_batches
from nas.stages.hf import llama_incompatibilities
from nas.winner.folder import load_winner
from nas.winner.fulltrain import (
    CHECKPOINTS,
    LOCK_FILE,
    FullTrainError,
    FullTrainEvents,
    Overrides,
    checkpoints,
    corpus_source,
    train_full,
)
from tests.search_helpers import STUDY, nas, tiny_search

# 8 steps of 8 x 64 tokens: enough to see the loss move, seconds on two cores.
SHORT = ["--tokens", "4096", "--eval-every", "4", "--checkpoint-every", "2"]
SHORT_API = Overrides(tokens=4096, eval_every=4, checkpoint_every=2)
# A budget far longer than any test (977 steps): a run started with it stops only when told to.
LONG = ["--tokens", "500000", "--eval-every", "100000", "--checkpoint-every", "100000"]
# How long to wait for something a `nas` process will do: generous, because the machine may be
# loaded (a fixed sleep once sent a signal before the first step was done). Waiting is for an
# event, so a fast machine does not pay it.
PATIENCE_S = 300
# The line `nas train` prints every log interval (4 steps with LONG): proof that steps are done.
STEP_LINE = re.compile(r"^step\s+[\d,]+\s+tokens")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The knee of the shared tiny search, exported once; each test trains a copy."""
    search = tiny_search(tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "winner"
    r = nas(["export", STUDY, "--pick", "knee", "--out", str(out), "--db", search.db], search.env, search.root)
    assert r.returncode == 0, r.stderr[-2000:]
    return SimpleNamespace(folder=out, env=search.env, root=search.root)


def copy_of(exported: SimpleNamespace, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(exported.folder, tmp_path / name))


class Running:
    """A `nas` command running in the background, its output lines collected as they come by two
    threads, so that a test can wait for a line (or any event) with a deadline instead of sleeping
    and hoping, and the pipes never fill."""

    def __init__(self, args: list[str], exported: SimpleNamespace) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "nas", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**exported.env, "COLUMNS": "300"},
                                     cwd=exported.root)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, happened: Callable[[], bool], what: str, timeout: float = PATIENCE_S) -> None:
        deadline = time.monotonic() + timeout
        while not happened():
            if self.proc.poll() is not None:
                pytest.fail(f"`nas` ended (exit {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def printed(self, pattern: re.Pattern[str]) -> bool:
        return any(pattern.search(line) for line in list(self.out))

    def finish(self, timeout: float = PATIENCE_S) -> tuple[int, str, str]:
        returncode = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=timeout)
        return returncode, "".join(self.out), "".join(self.err)

    def tail(self) -> str:
        return "".join(self.out)[-2000:] + "".join(self.err)[-2000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Heard(FullTrainEvents):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def test_train_stops_at_max_steps_then_resumes_on_the_same_curve_and_exports(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "run")
    r = nas(["train", str(folder), *SHORT, "--max-steps", "3"], exported.env, exported.root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--max-steps 3 reached: step 3 of 8" in r.stdout
    assert [p.name for p in checkpoints(folder)] == ["step-00000002.pt", "step-00000003.pt"]
    assert not (folder / "trained").exists()
    first = torch.load(checkpoints(folder)[-1], weights_only=True)

    r = nas(["train", str(folder)], exported.env, exported.root)  # the same command, flags from the run
    assert r.returncode == 0, r.stderr[-2000:]
    assert "continuing at step 4 of 8" in r.stdout and "trained fully" in r.stdout
    last = torch.load(checkpoints(folder)[-1], weights_only=True)
    assert last["step"] == 8 and [p[0] for p in last["curve"]][:3] == [1, 2, 3]
    assert last["curve"][:3] == first["curve"]  # the curve before the stop is kept, not restarted

    # The same run never interrupted: same steps, same losses, same weights.
    control = train_full(copy_of(exported, tmp_path, "control"), SHORT_API, final_export=False)
    assert [p.step for p in control.curve] == [p[0] for p in last["curve"]] == list(range(1, 9))
    np.testing.assert_allclose([p[2] for p in last["curve"]], [p.loss for p in control.curve], rtol=0, atol=1e-5)
    control_state = torch.load(checkpoints(control.folder)[-1], weights_only=True)["model"]
    for name, tensor in last["model"].items():
        torch.testing.assert_close(tensor, control_state[name], rtol=0, atol=1e-5)

    # The final export: the spec's bitwidth, the search's format, and it runs.
    report = json.loads((folder / "trained" / "report.json").read_text())
    spec = load_winner(folder).spec
    assert report["steps"] == 8 and report["val_bpb_onnx"] > 0 and report["onnx_bitwidth"] == spec.bitwidth
    from nas.stages.export import load_exported, ort_session, run_cached

    deployed = load_exported(folder / "trained" / "onnx")
    # the graph the search measured and scored: the deployment graph, or the plain one saying why
    assert deployed.graph == "gqa" or (deployed.graph == "plain" and deployed.graph_note), deployed.graph_note
    logits, _ = run_cached(ort_session(deployed), deployed, np.array([[1, 2, 3, 4]], dtype=np.int64), None)
    assert logits.shape == (1, 4, spec.vocab_size) and np.isfinite(logits).all()
    saved = torch.load(folder / "trained" / "model.pt", weights_only=True)
    assert saved["spec"] == spec.to_dict() and set(saved) == {"spec", "state_dict", "train_config"}
    assert (folder / "trained" / "hf" / "model.safetensors").is_file() == (not llama_incompatibilities(spec))

    # Once done, running it again trains nothing more.
    again = train_full(folder)
    assert again.step == 8 and again.resumed_from == 8 and again.onnx_bpb == report["val_bpb_onnx"]


def test_sigterm_stops_after_the_current_step_with_a_checkpoint_and_the_run_resumes(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "signal")
    # A budget far longer than the test: it must be the signal that stops it.
    run = Running(["train", str(folder), *LONG], exported)
    try:
        run.wait_for(lambda: run.printed(STEP_LINE), "step line on the output")  # some steps are done
        run.proc.send_signal(signal.SIGTERM)
        returncode, out, err = run.finish()
    finally:
        run.kill()
    assert returncode == 130, err[-2000:]
    assert "interrupted: step" in out and "again to continue" in out
    (stopped,) = checkpoints(folder)
    step = int(stopped.stem.split("-")[1])
    assert 1 <= step < 977

    result = train_full(folder, max_steps=step + 2)
    assert result.resumed_from == step and result.step == step + 2 and result.stopped_by == "max_steps"
    assert [p.name for p in checkpoints(folder)] == [stopped.name, f"step-{step + 2:08d}.pt"]
    assert all(p.step <= step + 2 for p in result.curve)


def test_a_truncated_latest_checkpoint_is_skipped_for_the_newest_that_loads(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "truncated")
    first = train_full(folder, SHORT_API, max_steps=3, final_export=False)
    step2, step3 = checkpoints(folder)
    assert (step2.name, step3.name) == ("step-00000002.pt", "step-00000003.pt")
    step3.write_bytes(step3.read_bytes()[: step3.stat().st_size // 2])  # as a full disk or a partial copy leaves it

    heard = Heard()
    result = train_full(folder, max_steps=4, final_export=False, events=heard)
    assert result.resumed_from == 2 and result.step == 4
    (skipped,) = [m for m in heard.messages if "step-00000003.pt" in m and "skipping" in m]
    assert "does not load" in skipped and "step-00000002.pt" in skipped and "\n" not in skipped, skipped
    # The bad file is kept aside, out of the checkpoints kept; step 3 was redone exactly.
    assert (folder / CHECKPOINTS / "step-00000003.pt.unreadable").is_file()
    assert [p.name for p in checkpoints(folder)] == ["step-00000002.pt", "step-00000004.pt"]
    assert [p.step for p in result.curve] == [1, 2, 3, 4]
    np.testing.assert_allclose([p.loss for p in result.curve[:3]], [p.loss for p in first.curve], rtol=0, atol=1e-5)


def test_no_checkpoint_that_loads_is_one_line_naming_the_folder(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "unloadable")
    train_full(folder, SHORT_API, max_steps=3, final_export=False)
    step2, step3 = checkpoints(folder)
    step2.write_bytes(b"")
    step3.write_bytes(step3.read_bytes()[:100])

    r = nas(["train", str(folder)], exported.env, exported.root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert str(folder / CHECKPOINTS) in lines[0] and "step-00000003.pt" in lines[0] and "--restart" in lines[0]
    assert checkpoints(folder) == [step2, step3]  # nothing moved when there is nothing to resume from
    assert train_full(folder, SHORT_API, max_steps=1, restart=True, final_export=False).step == 1
    assert not list((folder / CHECKPOINTS).glob("*.unreadable"))


def test_a_second_process_on_the_same_folder_is_refused_at_once_naming_the_holder(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "locked")
    lock = folder / CHECKPOINTS / LOCK_FILE
    first = Running(["train", str(folder), *LONG], exported)
    try:
        # Under way: its pid is in the lock (taken before the corpus is read), or at the latest it trains.
        first.wait_for(lambda: (lock.is_file() and lock.read_text().strip() == str(first.proc.pid))
                       or first.printed(STEP_LINE), "pid in the lock file or step line from the first process")
        second = nas(["train", str(folder), "--max-steps", "1"], exported.env, exported.root, timeout=PATIENCE_S)
        assert first.proc.poll() is None  # the second did not wait for the first to end
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        lines = [l for l in second.stderr.splitlines() if l.strip()]
        assert len(lines) == 1, lines
        assert str(folder) in lines[0] and f"process {first.proc.pid}" in lines[0], lines[0]
        first.proc.send_signal(signal.SIGTERM)
        returncode, _, err = first.finish()
    finally:
        first.kill()
    assert returncode == 130, err[-2000:]
    assert lock.read_text() == ""  # released, and no stale pid left in it


def test_a_resume_with_other_settings_is_refused_until_restart(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "mismatch")
    train_full(folder, SHORT_API, max_steps=1)
    with pytest.raises(FullTrainError, match=r"started with tokens = 4096, not 8192.*--restart"):
        train_full(folder, Overrides(tokens=8192))
    fresh = train_full(folder, Overrides(tokens=8192, checkpoint_every=4), max_steps=1, restart=True)
    assert fresh.resumed_from is None and fresh.run.tokens == 8192 and fresh.step == 1
    r = nas(["train", str(tmp_path)], exported.env, exported.root)
    assert r.returncode == 2 and "not an export folder" in r.stderr


def test_window_sampler_draws_the_windows_of_the_brief_training_and_resumes_them():
    ids = np.arange(1000, dtype=np.uint16)
    brief = train_batches(ids, 4, 16, seed=3)
    sampler = WindowSampler(ids, 4, 16, seed=3)
    for _ in range(5):
        (x, y), (x2, y2) = next(brief), sampler.next()
        assert (x == x2).all() and (y == y2).all()
    state = sampler.state()
    ahead = [sampler.next() for _ in range(3)]
    other = WindowSampler(ids, 4, 16, seed=99)
    other.restore(state)
    for x, _ in ahead:
        assert (other.next()[0] == x).all()


def test_the_study_subset_is_kept_only_while_the_budget_is_a_few_epochs_of_it(exported):
    export = load_winner(exported.folder)
    subset, epoch = export.manifest["corpus"]["max_bytes"], export.manifest["corpus"]["train_tokens"]
    assert subset and epoch
    assert corpus_source(export, Overrides(tokens=4 * epoch), None)[:2] == ("stdlib", subset)
    assert corpus_source(export, Overrides(tokens=4 * epoch + 1), None)[:2] == ("stdlib", None)
    assert corpus_source(export, Overrides(tokens=40 * epoch, max_bytes=subset), None)[:2] == ("stdlib", subset)
    assert corpus_source(export, Overrides(max_bytes=0), None)[:2] == ("stdlib", None)
    assert corpus_source(export, Overrides(data="notes.txt"), None)[:2] == ("notes.txt", None)


def test_cpu_defaults_and_bad_device_settings(exported, tmp_path):
    from nas.winner.fulltrain import _device_settings

    assert _device_settings("cpu", None, None) == ("cpu", False, False)  # no bf16, no compile on the CPU
    with pytest.raises(FullTrainError, match="--bf16 needs --device cuda"):
        _device_settings("cpu", True, None)
    with pytest.raises(FullTrainError, match="cpu or cuda"):
        _device_settings("tpu", None, None)
    if not torch.cuda.is_available():
        with pytest.raises(FullTrainError, match="no CUDA device"):
            _device_settings("cuda", None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_bf16_and_compile_resumes(exported, tmp_path):
    folder = copy_of(exported, tmp_path, "cuda")
    a = train_full(folder, SHORT_API, device="cuda", max_steps=3)
    assert a.step == 3
    b = train_full(folder, device="cuda", final_export=False)
    assert b.resumed_from == 3 and b.step == 8 and b.val_bpb is not None
