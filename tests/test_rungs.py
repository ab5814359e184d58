"""The rung rule: budgets, non-dominated ranking with crowding, and who goes on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nas.search.rungs import RungPlan, crowding_distances, decide, nondominated_ranks, ranking


def test_rung_budgets_grow_by_eta_up_to_the_whole_budget():
    assert RungPlan(900_000, count=3, eta=3).tokens() == [100_000, 300_000, 900_000]
    assert RungPlan(300_000).tokens() == [300_000]  # one rung: the whole budget
    with pytest.raises(ValueError):
        RungPlan(300_000, count=3, eta=1)


def test_nondominated_ranks_peel_fronts_in_order():
    pts = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [4, 4], [6, 6]], dtype=float)
    assert nondominated_ranks(pts).tolist() == [0, 0, 0, 1, 2, 3]
    # equal points dominate neither each other
    assert nondominated_ranks(np.array([[1.0, 1.0], [1.0, 1.0]])).tolist() == [0, 0]


def test_ranks_agree_with_a_brute_force_dominance_count():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(40, 3)).astype(float)
    ranks = nondominated_ranks(pts)
    for i, j in itertools.product(range(len(pts)), repeat=2):
        if (pts[j] <= pts[i]).all() and (pts[j] < pts[i]).any():
            assert ranks[j] < ranks[i]  # a dominator is on an earlier front


def test_crowding_prefers_the_extremes_and_sparse_points():
    pts = np.array([[0, 10], [1, 9], [1.1, 8.9], [5, 5], [10, 0]], dtype=float)
    d = crowding_distances(pts)
    assert np.isinf(d[0]) and np.isinf(d[4])
    assert d[3] > d[1] and d[3] > d[2]


def test_the_top_third_at_a_rung_goes_on_once_eta_trials_reached_it():
    # a grace of one cohort: the first eta - 1 arrivals stop, however good
    first = decide(7, {7: (2.0, 1.0)}, eta=3)
    assert not first.goes_on and first.kept == 0 and "none goes on before 3 reach it" in str(first)
    assert not decide(7, {7: (2.0, 1.0), 8: (3.0, 3.0)}, eta=3).goes_on
    assert decide(7, {7: (2.0, 1.0), 8: (3.0, 3.0), 9: (3.1, 3.1)}, eta=3).goes_on  # the top 1 of 3
    assert decide(7, {7: (2.0, 1.0), 8: (3.0, 3.0)}, eta=2).goes_on  # eta 2: the top 1 of 2
    # BPB at the rung and decode ms: 0 and 2 are on the front, 1 is dominated by both
    peers = {0: (2.0, 1.0), 1: (2.5, 2.0), 2: (2.2, 0.5), 3: (3.0, 3.0), 4: (2.9, 2.9), 5: (2.8, 2.8)}
    kept = [n for n in peers if decide(n, peers, eta=3).goes_on]
    assert sorted(kept) == [0, 2]  # ceil(6 / 3) = 2, both front points
    d = decide(3, peers, eta=3)
    assert not d.goes_on and (d.position, d.peers, d.kept) == (6, 6, 2) and "stops: 6 of 6" in str(d)


def test_ties_go_to_the_sparser_point_then_the_earlier_trial():
    front = {1: (1.0, 4.0), 2: (2.0, 3.0), 3: (2.1, 2.9), 4: (4.0, 1.0)}
    order = ranking(front)
    assert set(order[:2]) == {1, 4}  # the extremes, with infinite crowding
    assert ranking({5: (1.0, 1.0), 3: (1.0, 1.0)}) == [3, 5]
