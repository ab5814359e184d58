"""One real tiny search shared by every test module that only reads its results (export, full
training, optuna-dashboard): a real search costs most of those modules' time, and one is enough."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock

STUDY = "tiny-host"
# As tests/test_search.py: a 300 kB slice of the stdlib corpus, 8k training tokens per trial.
SEARCH = ["search", "--space", "tiny", "--device", "host", "--trials", "2", "--max-bytes", "300000",
          "--tokens", "8192", "--study", STUDY]


def fused_tiny_space(folder: Path) -> Path:
    """The ``tiny`` space without MLA, written to ``folder/tiny.yaml`` (so named that studies keep
    the names the tests read, ``tiny-DEVICE``).

    Made when an MLA draw got the plain graph, a dynamo trace (~10 s here) in every trial, reuses
    of its weights included: a rung test of 8 trials took 113 s on ``tiny`` and 14 s on this.
    MLA has the deployment graph now (built from the weights in under a second), but its plain
    graph is still traced where the deployment graph cannot go (d_model 48 at 8/4 bits, as for
    every kind), and the tests of the search's mechanics (rungs, reuse, resume, workers, budgets)
    do not depend on the attention kind, so they keep this space and its timings; MLA is searched
    by test_search's first test and the shared tiny search, and exported in test_export and
    test_deploy."""
    text = (Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml").read_text()
    fused = text.replace("attention: {choices: [mha, gqa, mqa, mla]}", "attention: {choices: [mha, gqa, mqa]}")
    assert fused != text, "search_spaces/tiny.yaml no longer lists its attention kinds as this expects"
    path = Path(folder) / "tiny.yaml"
    path.write_text(fused)
    return path


def nas(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # Wide enough that rich does not wrap the tables and paths the tests look for.
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True,
                          env={**env, "COLUMNS": "300"}, cwd=cwd, timeout=timeout)


def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished 2-trial search of the tiny space, run once per test session through the CLI (its
    own cache and database) in a folder under the session's base temp dir. Users must only read
    it: its database is the same for every module.

    Under pytest-xdist every worker has a base temp dir of its own inside one shared by the run:
    the search goes there, and a file lock makes the first worker that asks run it while the
    others wait for it (a failed search is run again by the next one that asks)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "tiny-search"
    env = dict(os.environ, NAS_CACHE_DIR=str(root / "cache"))
    db = f"sqlite:///{root / 'nas.db'}"
    done = root / "done"
    with FileLock(str(base / "tiny-search.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            r = nas([*SEARCH, "--db", db], env, root)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            done.write_text("ok")
    return SimpleNamespace(root=root, env=env, db=db)
