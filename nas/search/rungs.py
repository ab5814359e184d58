"""Rungs: multi-objective asynchronous successive halving on the training budget.

A trial trains to the first rung (a fraction of the study's token budget), is scored, and goes
on to the next rung only if it ranks in the top ``1/eta`` of every trial of the study that has
reached that rung, by non-dominated sorting of (BPB at that rung, the measured objectives), ties
broken by crowding distance (a point in a sparse part of the front is worth more to it), then
by the objectives in order (BPB first by default) and then by who got there first. Latency,
memory and size are measured before training, so only BPB has a fidelity; the measured figures
are the same at every rung.

What is ranked is trainings, not bitwidth draws: the weights do not depend on the bitwidth (it
is applied after training), so one training stands for a point at each bitwidth of the space,
its own and the others' (scored by a twin trial, or predicted), and takes the place of the best
of them. Ranked apiece, a good training's twins took the places that go on from other
architectures, and an architecture drawn at a slow bitwidth was judged at that bitwidth only.

This is ASHA's "stopping" form (as Ray Tune's ASHA and Optuna's successive-halving pruner run
it): the decision is taken when a trial reaches a rung, against the trials that reached it
before, so no worker waits for a cohort, and several local workers or Ray workers share the
rung results through the store. Optuna has no multi-objective pruner and Ray's schedulers rank
one metric, so the rule is ours (after Schmucker et al., 2021, "Multi-objective asynchronous
successive halving"). No trial goes on from the first rung before ``eta`` trials have reached
it (a grace of one cohort): otherwise the first trial of a study, drawn at random, would always
train the whole budget (the top 1/eta of one trial is that trial), which on a small machine was
a third of a 30-minute search spent on one architecture nobody chose. Above the first rung every
arrival was chosen already, and the stopping form never comes back to a trial that stopped: a
grace there stopped the first ``eta - 1`` trainings to reach the rung, the best ones, for good
(in a 30-minute main job, the best architecture at 100k tokens stopped there as the first to
arrive). So there the top ``ceil(n / eta)`` go on from the first arrival: the best so far.

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
    first), then by the objectives in order, then by number (who reached the rung first)."""
    return family_ranking({n: [p] for n, p in peers.items()})


def family_ranking(families: Mapping[int, Sequence[Sequence[float]]]) -> list[int]:
    """Family numbers best first, where a family is one training's weights seen at several
    points (the same weights quantized to each bitwidth: one point per bitwidth). Every point
    of every family is ranked together (front, then crowding within the front, larger first);
    a family takes the place of its best point. Ties (the two ends of a front of two
    objectives both have an infinite crowding distance) go to the better first objective, then
    the next (with BPB first, as by default, to the better model: BPB is the one figure the next
    rung changes), then to the lower number.

    Ranking points apiece let one good training fill the places that go on with its own
    bitwidths: four points of the same weights, three of them taking the places of other
    architectures that were never compared on their own best bitwidth."""
    numbers = sorted(families)
    if not all(families[n] for n in numbers):
        raise ValueError(f"a family with no point: {[n for n in numbers if not families[n]]}")
    owners = [n for n in numbers for _ in families[n]]
    points = np.array([list(p) for n in numbers for p in families[n]], dtype=float)
    # a figure that was not taken (inf) ranks worst, as the largest finite value
    points = np.where(np.isfinite(points), points, np.finfo(float).max)
    ranks = nondominated_ranks(points)
    crowd = np.zeros(len(points))
    for front in np.unique(ranks):
        members = np.flatnonzero(ranks == front)
        crowd[members] = crowding_distances(points[members])
    best: dict[int, tuple[float, ...]] = {}
    for i, n in enumerate(owners):
        key = (int(ranks[i]), -float(crowd[i]), *points[i].tolist())
        if n not in best or key < best[n]:
            best[n] = key
    return sorted(numbers, key=lambda n: (*best[n], n))


@dataclass(frozen=True)
class Decision:
    goes_on: bool
    position: int
    """1-based place of the trial in the ranking at the rung."""
    peers: int
    """Trainings at the rung (families of points: ``family_ranking``), the deciding one included."""
    kept: int
    """How many of them go on: ceil(peers / eta); at the first rung, none while fewer than
    ``eta`` have arrived."""
    eta: int = 3
    grace: bool = True
    """Whether none goes on before ``eta`` have arrived (the first rung)."""

    def __str__(self) -> str:
        verdict = "goes on" if self.goes_on else "stops"
        if self.grace and self.peers < self.eta:
            return f"{verdict}: {self.position} of {self.peers} at this rung, none goes on before {self.eta} reach it"
        return f"{verdict}: {self.position} of {self.peers} at this rung, the top {self.kept} go on"


def decide(me: int, families: Mapping[int, Sequence[Sequence[float]]], eta: int, *, grace: bool = True) -> Decision:
    """Whether training ``me`` goes on from a rung where ``families`` (trial number -> the
    objective values, all minimized, of each point its weights stand for at that rung: its own
    and those at other bitwidths; ``me`` included) have arrived. Each training counts once, in
    the place of its best point (``family_ranking``). ``grace`` (the first rung): none goes on
    before ``eta`` have arrived."""
    if me not in families:
        raise ValueError(f"trial {me} is not among the peers it is ranked with")
    order = family_ranking(families)
    kept = math.ceil(len(order) / eta) if len(order) >= eta or not grace else 0
    position = order.index(me) + 1
    return Decision(goes_on=position <= kept, position=position, peers=len(order), kept=kept, eta=eta, grace=grace)
