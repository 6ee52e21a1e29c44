"""Settings: environment parsing, validation, and the README's table staying true."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_app.settings import Settings, load_settings, settings_reference

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOTION_STREAM_BATCHING__MAX_WAIT_MS", "3.5")
    monkeypatch.setenv("EMOTION_STREAM_CACHE__L1_ENABLED", "false")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SASL_PASSWORD", "s3cret")
    s = load_settings()
    assert s.batching.max_wait_ms == 3.5
    assert s.cache.l1_enabled is False
    assert "s3cret" not in repr(s)
    assert s.kafka.sasl_password.get_secret_value() == "s3cret"


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.batching.max_batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("EMOTION_STREAM_BATCHING__MAX_BATCH_SIZE", "0"),
        ("EMOTION_STREAM_MODEL__ENGINE", "tensorrt"),
        ("EMOTION_STREAM_BATCHING__MIN_BATCH_TOKENS", "999999"),
        ("EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S", "1"),
    ],
)
def test_invalid_values_fail_at_start_up(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_every_setting_is_described_and_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    rows = settings_reference()
    assert len(rows) > 40
    for env, _, description in rows:
        assert description, env
        assert f"`{env}`" in readme, f"{env} missing from the README (run scripts/render_settings_table.py)"


def test_tokenizer_threads_zero_means_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert Settings().worker.resolved_tokenizer_threads() == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert Settings().worker.resolved_tokenizer_threads() == 2
    monkeypatch.setenv("EMOTION_STREAM_WORKER__TOKENIZER_THREADS", "7")
    assert Settings().worker.resolved_tokenizer_threads() == 7
