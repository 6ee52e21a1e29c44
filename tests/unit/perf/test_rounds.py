"""Rounds into figures: medians with min-max, speed-ups as the median of within-round ratios."""

from __future__ import annotations

import json
import math

import pytest

from stream_app.perf.rounds import CompareRound, Spread, round_ratios, spread, summarise_compare

pytestmark = pytest.mark.unit


def _round(corpus: str, target: str, rnd: int, eps: float, **kw: float) -> CompareRound:
    values: dict[str, float] = {"paced_rate_per_s": 25.0, "p50_ms": 30.0, "p99_ms": 40.0, "load_1m": 1.0, **kw}
    return CompareRound(
        corpus,
        target,
        rnd,
        eps,
        values["paced_rate_per_s"],
        values["p50_ms"],
        values["p99_ms"],
        values["load_1m"],
        missing=int(values.get("missing", 0)),
        duplicates=int(values.get("duplicates", 0)),
        cache_hit_rate=values.get("hit", 0.0),
    )


# ------------------------------------------------------------------------------------------------ spread
def test_spread_is_median_min_max_of_any_order() -> None:
    assert spread([5.0, 1.0, 3.0]) == Spread(3.0, 1.0, 5.0, 3)
    assert spread([4.0, 1.0]) == Spread(2.5, 1.0, 4.0, 2)  # an even count: the mean of the middle two


def test_spread_rejects_nothing_and_non_finite_values() -> None:
    with pytest.raises(ValueError, match="no values"):
        spread([])
    with pytest.raises(ValueError, match="non-finite"):
        spread([1.0, math.nan])
    with pytest.raises(ValueError, match="non-finite"):
        spread([math.inf])


def test_spread_format_shows_the_range_only_when_there_is_one() -> None:
    assert spread([363.04, 340.2, 380.1]).format(1) == "363.0 (340.2-380.1)"
    assert spread([7.0, 6.04, 7.96]).format(1, "x") == "7.0x (6.0x-8.0x)"
    assert spread([1.234]).format(2) == "1.23"


# ------------------------------------------------------------------------------------------------ ratios
def test_round_ratios_pair_by_index_and_skip_a_reference_that_measured_nothing() -> None:
    assert round_ratios([100.0, 90.0, 50.0], [10.0, 0.0, 25.0]) == [10.0, None, 2.0]
    with pytest.raises(ValueError, match="2 numerators for 3"):
        round_ratios([1.0, 2.0], [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------- summary
def test_speed_up_is_the_median_of_within_round_ratios_not_the_ratio_of_medians() -> None:
    # the machine got busier from round to round: both targets slowed down together
    rounds = [
        _round("unique", "baseline", 0, 50.0),
        _round("unique", "worker", 0, 400.0),
        _round("unique", "baseline", 1, 40.0),
        _round("unique", "worker", 1, 240.0),
        _round("unique", "baseline", 2, 20.0),
        _round("unique", "worker", 2, 180.0),
    ]
    base, worker = summarise_compare(rounds)
    assert (base.target, worker.target) == ("baseline", "worker")
    assert base.speed_up is None and base.speed_up_rounds == ()
    assert worker.speed_up_rounds == (8.0, 6.0, 9.0)
    assert worker.speed_up == Spread(8.0, 6.0, 9.0, 3)
    # the ratio of the medians (240 / 40 = 6.0) would pair measurements taken under different loads
    assert worker.burst_events_per_s.median / base.burst_events_per_s.median == 6.0


def test_each_corpus_pairs_with_its_own_baseline_and_rounds_pair_by_number() -> None:
    rounds = [
        _round("repeat50", "worker", 1, 600.0),  # given out of order: pairing is by round number
        _round("repeat50", "baseline", 0, 50.0),
        _round("repeat50", "worker", 0, 500.0),
        _round("repeat50", "baseline", 1, 60.0),
        _round("unique", "baseline", 0, 100.0),
        _round("unique", "worker", 0, 300.0),
        _round("unique", "worker-torch", 0, 200.0),
    ]
    by = {(c.corpus, c.target): c for c in summarise_compare(rounds)}
    assert by[("repeat50", "worker")].speed_up_rounds == (10.0, 10.0)
    assert by[("unique", "worker")].speed_up_rounds == (3.0,)
    assert by[("unique", "worker-torch")].speed_up_rounds == (2.0,)
    assert [c.target for c in summarise_compare(rounds)][:2] == ["worker", "baseline"]  # first-seen order


def test_a_round_without_its_reference_has_no_ratio() -> None:
    rounds = [
        _round("unique", "baseline", 0, 50.0),
        _round("unique", "worker", 0, 400.0),
        _round("unique", "worker", 1, 380.0),  # the baseline's round 1 never ran
        _round("unique", "baseline", 2, 0.0),  # ... and its round 2 measured nothing
        _round("unique", "worker", 2, 390.0),
    ]
    worker = summarise_compare(rounds)[1]
    assert worker.speed_up_rounds == (8.0, None)
    assert worker.speed_up == Spread(8.0, 8.0, 8.0, 1)
    alone = summarise_compare([_round("unique", "worker", 0, 400.0)])[0]
    assert alone.speed_up is None


def test_latency_load_and_counts_are_kept_per_round() -> None:
    rounds = [
        _round("unique", "worker", 0, 400.0, p50_ms=30.0, p99_ms=90.0, load_1m=2.5),
        _round("unique", "worker", 1, 410.0, p50_ms=28.0, p99_ms=40.0, load_1m=1.5, missing=2),
        _round("unique", "worker", 2, 420.0, p50_ms=29.0, p99_ms=45.0, load_1m=1.0, duplicates=1),
    ]
    (cell,) = summarise_compare(rounds)
    assert cell.p50_ms == Spread(29.0, 28.0, 30.0, 3)
    assert cell.p99_ms == Spread(45.0, 40.0, 90.0, 3)
    assert cell.load_1m == Spread(1.5, 1.0, 2.5, 3)
    assert cell.missing == (0, 2, 0) and cell.duplicates == (0, 0, 1)
    assert not cell.clean
    row = cell.row()
    assert row["missing"] == "0/2/0" and row["dup"] == "0/0/1"
    assert row["p99 ms"] == "45.0 (40.0-90.0)" and row["load 1m"] == "1.50 (1.00-2.50)"
    assert row["speed-up"] is None


def test_as_dict_is_json_and_keeps_the_per_round_ratios() -> None:
    rounds = [_round("unique", "baseline", i, 50.0 + i) for i in range(2)]
    rounds += [_round("unique", "worker", i, 400.0 + 10 * i) for i in range(2)]
    doc = json.loads(json.dumps(summarise_compare(rounds)[1].as_dict()))
    r1 = 410 / 51
    assert doc["speed_up"] == {"median": pytest.approx((8.0 + r1) / 2), "min": 8.0, "max": pytest.approx(r1), "n": 2}
    assert doc["speed_up_rounds"] == [8.0, pytest.approx(410 / 51)]
    assert doc["burst_events_per_s"] == {"median": 405.0, "min": 400.0, "max": 410.0, "n": 2}
    assert doc["clean"] is True


def test_a_round_given_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="round 0 of unique/worker given twice"):
        summarise_compare([_round("unique", "worker", 0, 1.0), _round("unique", "worker", 0, 2.0)])
