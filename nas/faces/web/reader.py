"""Reading studies for the page: through the store's API, once per change of a study.

A study of 10,000 trials takes about a second to read (its trials and its measurements), while
two small queries (trial counts by state, the front) say whether anything changed since the last
read; so a page, its figures, its table's sorting and its refresh reuse one read, and the figures
of one view of one read are drawn once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from nas.faces import plots
from nas.faces.web.errors import BadRequest, NotFound
from nas.faces.web.views import NAME_RE
from nas.store import Store, StudyRow, TrialRow

STUDIES_KEPT = 8
"""Reads kept: a few studies open at once; the oldest read goes."""
FIGURES_KEPT = 16
"""Figure sets kept (a study's four figures as JSON, for one view of one read)."""
TRIAL_NUMBERS = range(2**31)
"""The trial numbers the store can hold: its ``number`` column is a SQL INTEGER, 32 bits on
PostgreSQL (SQLite's are 64). Any other number is a 404 without asking the database, whose
driver could not even send it."""


class StudyReader:
    """The store, and the reads and figures of the studies the page showed last. Shared by the
    request threads (FastAPI runs the routes in a thread pool), hence the lock."""

    def __init__(self, store: Store, *, max_points: int, specs: plots.SpecCache) -> None:
        self.store = store
        self.max_points = max_points
        """At most this many trials (besides the front) are drawn per figure."""
        self.specs = specs
        self._lock = threading.Lock()
        self._reads: dict[str, tuple[str, plots.StudyData, plots.StudyData | None]] = {}
        self._figures: dict[tuple[Any, ...], str] = {}

    def study(self, name: str) -> StudyRow:
        if not NAME_RE.match(name):
            raise BadRequest("bad study name")
        study = self.store.find_study(name=name)
        if study is None:
            raise NotFound(f"no study {name!r} in {self.store.url}")
        return study

    def trial(self, name: str, number: int) -> tuple[StudyRow, TrialRow]:
        study = self.study(name)
        trial = self.store.find_trial(study=name, number=number) if number in TRIAL_NUMBERS else None
        if trial is None:
            raise NotFound(f"study {name!r} has no trial {number}")
        return study, trial

    def spec(self, arch_id: str | None) -> dict[str, Any] | None:
        """An architecture's spec fields, through the page's spec cache."""
        return self.specs.spec(self.store, arch_id)

    def stamp(self, study: StudyRow) -> str:
        """:func:`study_stamp` with the study's front."""
        return study_stamp(study, self.store)

    def load(self, name: str, *, thin: bool = False) -> plots.StudyData:
        return self.read(name, thin=thin)[1]

    def read(self, name: str, *, thin: bool = False) -> tuple[str, plots.StudyData]:
        """The study's stamp, and the whole study without specs or a sample of it with specs for
        figures (at most :attr:`max_points` besides the front)."""
        stamp = self.stamp(self.study(name))
        with self._lock:
            hit = self._reads.get(name)
        if hit is None or hit[0] != stamp:
            hit = (stamp, plots.load_study(self.store, name, specs=False, cache=self.specs), None)
        if thin and hit[2] is None:
            hit = (stamp, hit[1], plots.thinned(self.store, hit[1], self.max_points, cache=self.specs))
        with self._lock:
            self._reads[name] = hit
            while len(self._reads) > STUDIES_KEPT:
                self._reads.pop(next(iter(self._reads)))
        return stamp, (hit[2] if thin else hit[1])  # type: ignore[return-value]

    def figures_json(self, key: tuple[Any, ...], draw: Callable[[], str]) -> str:
        """The figures' JSON for ``key`` (a study, its stamp and a view), drawn by ``draw`` only
        when this reader has not drawn them already."""
        body = self._figures.get(key)
        if body is None:
            body = draw()
            with self._lock:
                self._figures[key] = body
                while len(self._figures) > FIGURES_KEPT:
                    self._figures.pop(next(iter(self._figures)))
        return body


def study_stamp(study: StudyRow, store: Store | None = None) -> str:
    """Changes whenever a trial starts or ends (and, given the store, when the front changes):
    what the page's refresh and the read cache compare."""
    counts = "-".join(f"{k}{v}" for k, v in sorted(study.trial_counts.items()))
    if store is None:
        return counts
    return counts + "/" + ",".join(str(t.number) for t in store.pareto(study=study.name))


def studies_stamp(studies: list[StudyRow]) -> str:
    return "|".join(f"{s.name}:{study_stamp(s)}" for s in studies)
