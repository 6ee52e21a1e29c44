"""The replay's corpus builder and its accounting, on synthetic records (no broker)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app.cache.keys import normalise
from stream_app.errors import DataError, InputError
from stream_app.perf.replay import (
    MALFORMED_KINDS,
    Corpus,
    ReplayAccounting,
    build_corpus,
    load_texts,
    percentiles,
    read_report,
    write_report,
    zipf_weights,
)
from stream_app.records import decode_chat_message, event_id_for

pytestmark = pytest.mark.unit

TEXTS = [f"message number {i} about something" for i in range(400)]
TOPIC = "chat.messages.v1.test"


# ---------------------------------------------------------------------------------------------- corpus
def test_shares_are_exact_and_ids_unique() -> None:
    corpus = build_corpus(TEXTS, 500, repeat_share=0.3, malformed_share=0.04, conversations=50, seed=1)
    kinds = Counter(m.kind for m in corpus.messages)
    assert len(corpus) == 500
    assert kinds["repeat"] == 150
    assert sum(kinds[k] for k in MALFORMED_KINDS) == 20
    assert kinds["unique"] == 330
    # every malformed kind is represented (dealt in turn)
    assert all(kinds[k] == 5 for k in MALFORMED_KINDS)
    ids = [m.message_id for m in corpus.messages]
    assert len(set(ids)) == len(ids)
    assert [m.index for m in corpus.messages] == list(range(500))


def test_conversations_are_spread_over_all_ids() -> None:
    corpus = build_corpus(TEXTS, 300, conversations=100, seed=2)
    per_conv = Counter(m.conversation_id for m in corpus.messages)
    assert len(per_conv) == 100
    assert set(per_conv.values()) == {3}
    assert all(m.key == m.conversation_id.encode() for m in corpus.messages)


def test_unique_texts_are_unique_and_repeats_come_from_the_pool() -> None:
    corpus = build_corpus(TEXTS, 400, repeat_share=0.5, conversations=10, seed=3, pool_size=20)
    uniques = [normalise(m.text or "") for m in corpus.messages if m.kind == "unique"]
    repeats = [m.text for m in corpus.messages if m.kind == "repeat"]
    pool = set(corpus.popular_pool)
    assert len(pool) == 20
    assert len(set(uniques)) == len(uniques)
    assert not set(uniques) & {normalise(p) for p in pool}
    assert set(repeats) <= pool


def test_repeats_follow_zipf() -> None:
    corpus = build_corpus(TEXTS, 20_000, repeat_share=1.0, conversations=10, seed=4, pool_size=50)
    counts = Counter(m.text for m in corpus.messages)
    expected = zipf_weights(50, 1.1)
    # the pool is in rank order: the observed share of each of the top ranks is close to the law
    for rank in range(5):
        observed = counts[corpus.popular_pool[rank]] / 20_000
        assert observed == pytest.approx(expected[rank], abs=0.015), rank
    top, tail = counts[corpus.popular_pool[0]], counts[corpus.popular_pool[-1]]
    assert top > 20 * tail


def test_zipf_weights_sum_to_one_and_decrease() -> None:
    w = zipf_weights(100, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(w))
    assert w[0] / w[1] == pytest.approx(2**1.1)


def test_malformed_messages_fail_the_real_decoder_with_the_planted_reason() -> None:
    corpus = build_corpus(TEXTS, 200, malformed_share=0.5, conversations=5, seed=5)
    for m in corpus.messages:
        key, value = m.record()
        assert key == m.conversation_id.encode()
        if m.malformed:
            with pytest.raises(InputError) as info:
                decode_chat_message(value)
            assert info.value.reason == m.expected_reason, (m.kind, value)
        else:
            decoded = decode_chat_message(value)
            assert decoded.message_id == m.message_id
            assert decoded.text == m.text
            assert m.expected_reason is None


def test_too_few_texts_are_varied_to_stay_unique() -> None:
    corpus = build_corpus(TEXTS[:10], 35, conversations=5, seed=6)
    texts = [m.text for m in corpus.messages]
    assert len(set(texts)) == 35
    assert corpus.varied_unique == 25


@pytest.mark.parametrize(
    ("repeat", "malformed"),
    [(-0.1, 0.0), (0.0, 1.5), (0.7, 0.4)],
)
def test_invalid_shares_are_refused(repeat: float, malformed: float) -> None:
    with pytest.raises(ValueError, match="share"):
        build_corpus(TEXTS, 10, repeat, malformed, 5, 0)


def test_same_seed_same_corpus() -> None:
    a = build_corpus(TEXTS, 100, 0.5, 0.1, 7, 9, id_prefix="x")
    b = build_corpus(TEXTS, 100, 0.5, 0.1, 7, 9, id_prefix="x")
    c = build_corpus(TEXTS, 100, 0.5, 0.1, 7, 10, id_prefix="x")
    assert [(m.kind, m.text) for m in a.messages] == [(m.kind, m.text) for m in b.messages]
    assert [(m.kind, m.text) for m in a.messages] != [(m.kind, m.text) for m in c.messages]


def test_load_texts_tsv_jsonl_and_a_bad_line(tmp_path: Path) -> None:
    (tmp_path / "dev.tsv").write_text("hello there\t1\tid1\n\t2\tid2\nsecond one\t3\tid3\n", encoding="utf-8")
    assert load_texts("dev", tmp_path) == ["hello there", "second one"]
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b", "other": 1}\n', encoding="utf-8")
    assert load_texts(jl, tmp_path) == ["a", "b"]
    jl.write_text('{"text": "a"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:2"):
        load_texts(jl, tmp_path)
    with pytest.raises(DataError):
        load_texts(tmp_path / "missing.tsv", tmp_path)


# ------------------------------------------------------------------------------------------ accounting
def _event(corpus: Corpus, index: int, partition: int, offset: int, level: str = "none") -> dict[str, Any]:
    m = corpus.messages[index]
    return {
        "schema": "emotion_event.v1",
        "event_id": event_id_for(TOPIC, partition, offset),
        "message_id": m.message_id,
        "conversation_id": m.conversation_id,
        "cache": {"hit": level != "none", "level": level},
        "timings_ms": {"decode": 0.1, "cache": 0.1, "queue_wait": 3.0, "tokenize": 1.0, "infer": 9.0,
                       "postprocess": 0.2, "total": 14.0},
        "source": {"topic": TOPIC, "partition": partition, "offset": offset},
        "model": {"name": "m", "version": "v", "runtime": "torch", "precision": "fp32", "device": "cpu"},
        "received_at": "2023-11-14T22:13:20.250Z",  # 1_700_000_000.25
    }  # fmt: skip


def _dead(partition: int, offset: int, reason: str) -> dict[str, Any]:
    return {"schema": "dead_letter.v1", "reason": reason, "source": {"topic": TOPIC, "partition": partition,
            "offset": offset}}  # fmt: skip


def _sent(acc: ReplayAccounting, corpus: Corpus, t0: float = 1000.0) -> dict[int, tuple[int, int]]:
    coords = {}
    for m in corpus.messages:
        acc.on_sent(m.index, t0 + m.index * 0.01)
        coords[m.index] = (m.index % 2, m.index // 2)
    return coords


def _small_corpus() -> Corpus:
    corpus = build_corpus(TEXTS, 12, repeat_share=0.0, malformed_share=0.25, conversations=3, seed=11, id_prefix="t")
    assert sum(m.malformed for m in corpus.messages) == 3
    return corpus


def test_everything_accounted_for() -> None:
    corpus = _small_corpus()
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    coords = _sent(acc, corpus)
    for i, (p, o) in coords.items():
        acc.on_acked(i, p, o)
    for m in corpus.messages:
        p, o = coords[m.index]
        if m.malformed:
            acc.on_dead_letter(_dead(p, o, str(m.expected_reason)), 1001.0 + m.index * 0.01)
        else:
            acc.on_event(_event(corpus, m.index, p, o, level="l1" if m.index % 3 == 0 else "none"), 1001.0)
    assert acc.done
    r = acc.report(started_at=1000.0, finished_at=1002.0)
    assert r.completed and r.missing == 0
    assert r.unique_events == 9 and r.events == 9
    assert r.dead_letters == 3
    assert r.dead_letters_by_reason == r.expected_dead_letters
    assert r.unexpected_dead_letters == 0 and r.reason_mismatches == 0
    assert r.duplicate_events == 0 and r.duplicate_event_ids == 0
    hits = sum(1 for m in corpus.messages if not m.malformed and m.index % 3 == 0)
    assert r.cache_levels.get("l1", 0) == hits
    assert r.cache_hit_rate == pytest.approx(hits / 9)
    assert r.run["model"]["name"] == "m"


def test_missing_duplicates_and_redeliveries_are_detected() -> None:
    corpus = _small_corpus()
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    coords = _sent(acc, corpus)
    for i, (p, o) in coords.items():
        acc.on_acked(i, p, o)
    good = [m.index for m in corpus.messages if not m.malformed]
    bad = [m for m in corpus.messages if m.malformed]
    # the first good message never comes back; the second comes twice with the same event id
    # (a redelivery after a crash); the third twice with different event ids (a real duplicate)
    for i in good[1:]:
        p, o = coords[i]
        acc.on_event(_event(corpus, i, p, o), 1001.0)
    p, o = coords[good[1]]
    acc.on_event(_event(corpus, good[1], p, o), 1001.5)
    p, o = coords[good[2]]
    acc.on_event(_event(corpus, good[2], p, o + 1000), 1001.5)
    for m in bad[:-1]:  # the last malformed message gets no dead letter either
        acc.on_dead_letter(_dead(*coords[m.index], str(m.expected_reason)), 1001.0)
    assert not acc.done
    r = acc.report(started_at=1000.0, finished_at=1003.0, timed_out=True)
    assert r.missing == 2
    assert set(r.missing_ids) == {corpus.messages[good[0]].message_id, bad[-1].message_id}
    assert r.duplicate_events == 2
    assert r.duplicate_event_ids == 1
    assert r.source_mismatches == 1
    assert r.unique_events == len(good) - 1
    assert not r.completed and r.timed_out


def test_dead_letters_match_by_source_even_before_the_ack() -> None:
    corpus = _small_corpus()
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    coords = _sent(acc, corpus)
    bad = [m for m in corpus.messages if m.malformed]
    good = [m for m in corpus.messages if not m.malformed]
    # dead letter arrives before the producer saw its acknowledgement: parked, then matched
    acc.on_dead_letter(_dead(*coords[bad[0].index], str(bad[0].expected_reason)), 1001.0)
    assert acc.resolved == 0
    acc.on_acked(bad[0].index, *coords[bad[0].index])
    assert acc.resolved == 1
    for i, (p, o) in coords.items():
        if i != bad[0].index:
            acc.on_acked(i, p, o)
    # a well-formed message dead-lettered: unexpected; a malformed one with the wrong reason: mismatch
    acc.on_dead_letter(_dead(*coords[good[0].index], "inference_failed"), 1001.0)
    acc.on_dead_letter(_dead(*coords[bad[1].index], "text_too_long"), 1001.0)
    acc.on_dead_letter(_dead(*coords[bad[1].index], "text_too_long"), 1001.2)  # redelivered
    acc.on_dead_letter(_dead(99, 99, "schema"), 1001.0)  # not ours
    acc.on_dead_letter({"reason": "schema", "source": {"topic": "other", "partition": 0, "offset": 0}}, 1001.0)
    r = acc.report(started_at=1000.0, finished_at=1002.0)
    assert r.unexpected_dead_letters == 1
    assert r.unexpected_dead_letter_reasons == {"inference_failed": 1}
    assert r.reason_mismatches == 1
    assert r.duplicate_dead_letters == 1
    assert r.unmatched_dead_letters == 2
    assert r.dead_letters == 3


def test_foreign_events_are_ignored_and_order_is_checked() -> None:
    corpus = build_corpus(TEXTS, 6, conversations=1, seed=12, id_prefix="o")
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    for m in corpus.messages:
        acc.on_sent(m.index, 1000.0)
        acc.on_acked(m.index, 0, m.index)
    foreign = _event(corpus, 0, 0, 0) | {"message_id": "someone-else-1"}
    acc.on_event(foreign, 1000.5)
    order = [0, 1, 3, 2, 4, 5]  # one conversation, one partition: 3 before 2 is a violation
    for i in order:
        acc.on_event(_event(corpus, i, 0, i), 1001.0 + i)
    r = acc.report(started_at=1000.0, finished_at=1010.0)
    assert r.foreign_events == 1
    assert r.order_violations == 1
    assert r.unique_events == 6


def test_latency_throughput_and_stage_means() -> None:
    corpus = build_corpus(TEXTS, 100, conversations=4, seed=13, id_prefix="l")
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    for m in corpus.messages:
        acc.on_sent(m.index, 1000.0 + m.index * 0.1)  # 10 messages/s
        acc.on_acked(m.index, 0, m.index)
        acc.on_event(_event(corpus, m.index, 0, m.index), 1000.0 + m.index * 0.1 + 0.020 + (m.index % 10) * 0.001)
    for k in range(4):
        acc.on_stage_metrics({"size": 25, "real_tokens": 100, "padded_tokens": 200, "token_budget": 4096,
                              "stage_ms": {"queue_wait": 4.0 * k, "tokenize": 1.0, "infer": 10.0,
                                           "postprocess": 0.5, "produce": 2.0}}, 1001.0)  # fmt: skip
    acc.on_lag(1001.0, 5)
    acc.on_lag(1002.0, 0)
    r = acc.report(started_at=1000.0, finished_at=1011.0, offered_rate_per_s=10.0)
    assert r.latency_ms["p50"] == pytest.approx(24.5, abs=0.6)
    assert r.latency_ms["max"] == pytest.approx(29.0, abs=0.01)
    assert r.throughput_events_per_s == pytest.approx(100 / 9.9, rel=0.01)
    assert r.steady_throughput_events_per_s == pytest.approx(10.0, rel=0.05)
    assert r.stage_ms_mean["queue_wait"] == pytest.approx(6.0)
    assert r.batch_summary["padding_waste"] == pytest.approx(0.5)
    assert r.max_lag == 5 and r.final_lag == 0
    assert sum(row["sent_per_s"] * row["window_s"] for row in r.timeline) == pytest.approx(100)


def test_percentiles_of_nothing_are_zero() -> None:
    assert percentiles([])["p99"] == 0.0
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5)
    assert p["max"] == 100


def test_report_round_trips_through_json_and_draws_a_png(tmp_path: Path) -> None:
    corpus = _small_corpus()
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    coords = _sent(acc, corpus)
    for i, (p, o) in coords.items():
        acc.on_acked(i, p, o)
        if not corpus.messages[i].malformed:
            acc.on_event(_event(corpus, i, p, o), 1001.0 + i * 0.05)
    report = acc.report(started_at=1000.0, finished_at=1002.0)
    json_path, png_path = write_report(report, tmp_path / "out" / "replay-test")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = read_report(tmp_path / "out" / "replay-test")
    assert loaded.summary() == report.summary()
    assert loaded.event_samples == orjson.loads(orjson.dumps(report.event_samples))
    assert json_path.suffix == ".json"


def test_event_samples_carry_the_time_to_reach_the_worker() -> None:
    corpus = build_corpus(TEXTS, 1, conversations=1, seed=15, id_prefix="w")
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    acc.on_sent(0, 1_700_000_000.0)
    acc.on_acked(0, 0, 0)
    acc.on_event(_event(corpus, 0, 0, 0), 1_700_000_000.5)
    sample = acc.report(started_at=1_700_000_000.0, finished_at=1_700_000_001.0).event_samples[0]
    assert sample["to_worker_ms"] == pytest.approx(250.0, abs=0.01)
    assert sample["e2e_ms"] == pytest.approx(500.0, abs=0.01)


def test_stage_metrics_of_an_earlier_run_are_dropped() -> None:
    acc = ReplayAccounting(_small_corpus(), input_topic=TOPIC)
    acc.not_before = 1_700_000_000.0
    acc.on_stage_metrics({"emitted_at": "2023-11-14T22:13:19.000Z", "size": 1}, 1_700_000_001.0)  # 1 s before
    acc.on_stage_metrics({"emitted_at": "2023-11-14T22:13:21.000Z", "size": 2}, 1_700_000_001.0)
    assert [r["size"] for r in acc.stage_records] == [2]


def test_a_failed_produce_ends_the_wait_but_counts_as_missing() -> None:
    corpus = build_corpus(TEXTS, 3, conversations=1, seed=14, id_prefix="f")
    acc = ReplayAccounting(corpus, input_topic=TOPIC)
    for m in corpus.messages[:2]:
        acc.on_sent(m.index, 1000.0)
        acc.on_acked(m.index, 0, m.index)
        acc.on_event(_event(corpus, m.index, 0, m.index), 1000.1)
    assert not acc.done
    acc.on_produce_error(2)
    assert acc.done
    r = acc.report(started_at=1000.0, finished_at=1001.0)
    assert r.produce_errors == 1 and r.missing == 1 and not r.completed
