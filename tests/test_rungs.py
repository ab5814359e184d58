"""The rung rule: budgets, non-dominated ranking with crowding, and who goes on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nas.search.rungs import RungPlan, crowding_distances, decide, family_ranking, nondominated_ranks, ranking


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
    # a grace of one cohort at the first rung: the first eta - 1 arrivals stop, however good
    first = decide(7, {7: [(2.0, 1.0)]}, eta=3)
    assert not first.goes_on and first.kept == 0 and "none goes on before 3 reach it" in str(first)
    assert not decide(7, {7: [(2.0, 1.0)], 8: [(3.0, 3.0)]}, eta=3).goes_on
    assert decide(7, {7: [(2.0, 1.0)], 8: [(3.0, 3.0)], 9: [(3.1, 3.1)]}, eta=3).goes_on  # the top 1 of 3
    assert decide(7, {7: [(2.0, 1.0)], 8: [(3.0, 3.0)]}, eta=2).goes_on  # eta 2: the top 1 of 2
    # above the first rung every arrival was chosen already: the best so far goes on
    alone = decide(7, {7: [(2.0, 1.0)]}, eta=3, grace=False)
    assert alone.goes_on and alone.kept == 1 and "goes on: 1 of 1 at this rung, the top 1 go on" in str(alone)
    assert decide(8, {7: [(2.0, 1.0)], 8: [(1.9, 0.9)]}, eta=3, grace=False).goes_on
    assert not decide(7, {7: [(2.0, 1.0)], 8: [(1.9, 0.9)]}, eta=3, grace=False).goes_on
    # BPB at the rung and decode ms: 0 and 2 are on the front, 1 is dominated by both
    points = {0: (2.0, 1.0), 1: (2.5, 2.0), 2: (2.2, 0.5), 3: (3.0, 3.0), 4: (2.9, 2.9), 5: (2.8, 2.8)}
    peers = {n: [p] for n, p in points.items()}
    kept = [n for n in peers if decide(n, peers, eta=3).goes_on]
    assert sorted(kept) == [0, 2]  # ceil(6 / 3) = 2, both front points
    d = decide(3, peers, eta=3)
    assert not d.goes_on and (d.position, d.peers, d.kept) == (6, 6, 2) and "stops: 6 of 6" in str(d)


def test_ties_go_to_the_sparser_point_then_the_earlier_trial():
    front = {1: (1.0, 4.0), 2: (2.0, 3.0), 3: (2.1, 2.9), 4: (4.0, 1.0)}
    order = ranking(front)
    assert set(order[:2]) == {1, 4}  # the extremes, with infinite crowding
    assert ranking({5: (1.0, 1.0), 3: (1.0, 1.0)}) == [3, 5]
    # the two ends of a front of two both have infinite crowding: the better first objective
    # (BPB) goes first, whoever arrived first
    assert ranking({4: (5.56, 0.030), 0: (4.78, 0.052), 8: (4.60, 0.057)}) == [8, 4, 0]


def test_a_training_takes_one_place_whatever_its_bitwidths():
    # (BPB, decode ms) at a rung. Trial 8's weights at four bitwidths; 21's own fp32 point and
    # its predicted int4 one; 30 fast and worse; 31 and the rest behind
    eight = [(1.964, 0.60), (1.964, 0.47), (1.9645, 0.41), (1.966, 0.39)]
    families = {8: eight, 21: [(1.975, 0.62), (1.975, 0.37)], 30: [(2.05, 0.35)], 31: [(1.99, 0.50)],
                32: [(2.2, 0.8)], 33: [(2.3, 0.9)], 34: [(2.4, 1.0)]}
    assert family_ranking(families)[:4] == [8, 30, 21, 31]
    d = decide(21, families, eta=3)
    assert d.goes_on and (d.position, d.peers, d.kept) == (3, 7, 3)
    assert not decide(31, families, eta=3).goes_on
    # judged at its own slow bitwidth alone, 21 is behind 31 and stops
    assert not decide(21, families | {21: [(1.975, 0.62)]}, eta=3).goes_on
    # the rule before: every trial one point, 8's bitwidths as trials 8-11, 21 at fp32 only
    apiece = {8 + i: [p] for i, p in enumerate(eight)} | {k: v[:1] for k, v in families.items() if k != 8}
    assert not decide(21, apiece, eta=3).goes_on
    with pytest.raises(ValueError, match="no point"):
        family_ranking({1: [(1.0, 1.0)], 2: []})


def test_family_ranking_of_single_points_is_the_point_ranking():
    rng = np.random.default_rng(1)
    pts = {n: tuple(rng.random(2)) for n in range(12)}
    assert family_ranking({n: [p] for n, p in pts.items()}) == ranking(pts)
