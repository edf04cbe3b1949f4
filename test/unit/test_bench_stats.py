"""The benchmarks' pure helpers (bench/stats.py): no timing is asserted anywhere."""

from __future__ import annotations

import pytest

from bench.stats import percentile, ratio, spread, summary


def test_percentile_interpolates_between_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_has_median_spread_and_asked_percentiles():
    s = summary([10, 1, 100, 2, 3], percentiles=(50, 90))
    assert s == {"n": 5, "median": 3.0, "min": 1.0, "max": 100.0, "p50": 3.0, "p90": 64.0}
    assert summary([]) == {"n": 0}


def test_ratio_and_spread_text():
    assert ratio(3, 2) == 1.5
    assert ratio(None, 2) is None and ratio(1, 0) is None
    assert spread(summary([1, 2, 4]), " s") == "2.0 s (1.0\u20134.0)"
    assert spread(summary([7])) == "7.0"
    assert spread({"n": 0}) == "n/a"


def test_failures_are_sorted_by_kill_into_cut_and_failed_new():
    from bench.sections import attribute_failures

    kills = [{"killed_wall": 100.0}, {"killed_wall": 110.0}]
    started = [95.0, 99.0, 101.0, 108.5, 112.0]
    # 95 failed before any kill; 99 was open at kill 1 (cut); 101 failed new after
    # kill 1; 108.5 was open at kill 2 (cut by it, not a failure of kill 1); 112 new after kill 2.
    failed_at = [96.0, 100.1, 101.2, 110.2, 112.1]
    attribute_failures(kills, started, failed_at)
    assert (kills[0]["failed_new"], kills[0]["cut"]) == (1, 1)
    assert (kills[1]["failed_new"], kills[1]["cut"]) == (1, 1)
