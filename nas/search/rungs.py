"""Rungs: multi-objective asynchronous successive halving on the training budget.

A trial trains to the first rung (a fraction of the study's token budget), is scored, and goes
on to the next rung only if it ranks in the top ``1/eta`` of every trial of the study that has
reached that rung, by non-dominated sorting of (BPB at that rung, the measured objectives), ties
broken by crowding distance (a point in a sparse part of the front is worth more to it) and then
by who got there first. Latency, memory and size are measured before training, so only BPB has a
fidelity; the measured figures are the same at every rung.

This is ASHA's "stopping" form (as Ray Tune's ASHA and Optuna's successive-halving pruner run
it): the decision is taken when a trial reaches a rung, against the trials that reached it
before, so no worker waits for a cohort, and several local workers or Ray workers share the
rung results through the store. Optuna has no multi-objective pruner and Ray's schedulers rank
one metric, so the rule is ours (after Schmucker et al., 2021, "Multi-objective asynchronous
successive halving"). No trial goes on from a rung before ``eta`` trials have reached it (a
grace of one cohort): otherwise the first trial of a study, drawn at random, would always train
the whole budget (the top 1/eta of one trial is that trial), which on a small machine was a
third of a 30-minute search spent on one architecture nobody chose.

The schedule of every rung is the whole budget's (warm-up and cosine decay over ``tokens``), so
a trial that goes on continues the very run it would have been, from where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nas.spec.errors import NasError
from nas.store import non_dominated


class RungPlanError(NasError, ValueError):
    """Rungs that cannot be: fewer than one, a growth below 2, or no budget to split."""


REUSED_SHARE = 0.1
"""What a trial that reused another's trained weights counts for ``--trials``: its measure,
export and scoring, which were 5-10% of a whole-budget trial's time (bench/README.md, "Cost of
a trial"), rounded up."""


@dataclass(frozen=True)
class RungPlan:
    """Where a study's trials are scored: ``count`` rungs, each ``eta`` times the budget of the
    one before, the last one the whole budget ``top_tokens``. One rung: every trial trains the
    whole budget (no successive halving)."""

    top_tokens: int
    count: int = 1
    eta: int = 3

    def __post_init__(self) -> None:
        if self.count < 1 or self.eta < 2 or self.top_tokens < 1:
            raise RungPlanError(f"--rungs must be >= 1 and --eta >= 2 with a token budget, got {self.count}, "
                                f"{self.eta} and {self.top_tokens} tokens")

    def tokens(self) -> list[int]:
        """Each rung's budget in tokens, smallest first."""
        return [max(1, math.ceil(self.top_tokens / self.eta ** (self.count - 1 - k))) for k in range(self.count)]

    @property
    def top(self) -> int:
        return self.count - 1

    def share(self, tokens: int, *, reused: bool = False) -> float:
        """How much of a trial a trial that trained ``tokens`` counts as, for ``--trials``: its
        share of the whole budget, and at least the first rung's share (a trial rejected before
        training still cost its measurement). With one rung every trial counts 1, as before. So
        ``--trials 10`` buys about ten whole-budget trainings whatever the rungs, and a user can
        plan it from the cost of one trial.

        A trial that trained nothing because it took another trial's weights (the same
        architecture at another bitwidth: ``SearchConfig.other_bitwidths``) counts
        ``REUSED_SHARE``, what its export and scoring cost beside a trial's training, in any plan."""
        if reused:
            return REUSED_SHARE
        if self.count == 1:
            return 1.0
        first = self.tokens()[0] / self.top_tokens
        return max(first, min(1.0, tokens / self.top_tokens))


def nondominated_ranks(points: np.ndarray) -> np.ndarray:
    """Front index of each row (0: not dominated; 1: dominated only by front 0; ...), all
    objectives minimized: the store's non-dominated set, peeled front by front."""
    ranks = np.full(len(points), -1, dtype=int)
    remaining = np.arange(len(points))
    front = 0
    while remaining.size:
        on_front = non_dominated(points[remaining], ["minimize"] * points.shape[1])
        ranks[remaining[on_front]] = front
        remaining = remaining[~on_front]
        front += 1
    return ranks


def crowding_distances(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within its own set (infinite at the extremes)."""
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(points[:, j], kind="stable")
        span = points[order[-1], j] - points[order[0], j]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (points[order[2:], j] - points[order[:-2], j]) / span
    return distance


def ranking(peers: Mapping[int, Sequence[float]]) -> list[int]:
    """Trial numbers best first: by front, then by crowding distance within the front (larger
    first), then by number (who reached the rung first)."""
    numbers = sorted(peers)
    points = np.array([list(peers[n]) for n in numbers], dtype=float)
    # a figure that was not taken (inf) ranks worst, as the largest finite value
    points = np.where(np.isfinite(points), points, np.finfo(float).max)
    ranks = nondominated_ranks(points)
    crowd = np.zeros(len(numbers))
    for front in np.unique(ranks):
        members = np.flatnonzero(ranks == front)
        crowd[members] = crowding_distances(points[members])
    order = sorted(range(len(numbers)), key=lambda i: (ranks[i], -crowd[i], numbers[i]))
    return [numbers[i] for i in order]


@dataclass(frozen=True)
class Decision:
    goes_on: bool
    position: int
    """1-based place of the trial in the ranking at the rung."""
    peers: int
    """Trials at the rung, the deciding one included."""
    kept: int
    """How many of them go on: ceil(peers / eta), none while fewer than ``eta`` have arrived."""
    eta: int = 3

    def __str__(self) -> str:
        verdict = "goes on" if self.goes_on else "stops"
        if self.peers < self.eta:
            return f"{verdict}: {self.position} of {self.peers} at this rung, none goes on before {self.eta} reach it"
        return f"{verdict}: {self.position} of {self.peers} at this rung, the top {self.kept} go on"


def decide(me: int, peers: Mapping[int, Sequence[float]], eta: int) -> Decision:
    """Whether trial ``me`` goes on from a rung where ``peers`` (trial number -> objective values
    at that rung, all minimized, ``me`` included) have arrived."""
    if me not in peers:
        raise ValueError(f"trial {me} is not among the peers it is ranked with")
    order = ranking(peers)
    kept = math.ceil(len(order) / eta) if len(order) >= eta else 0
    position = order.index(me) + 1
    return Decision(goes_on=position <= kept, position=position, peers=len(order), kept=kept, eta=eta)
