from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_with_one_prefix(monkeypatch):
    monkeypatch.setenv("CLIP_MODELS", "RN50, ViT-B-32")
    monkeypatch.setenv("CLIP_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CLIP_OFFLINE", "true")
    s = Settings()
    assert s.models == ["RN50", "ViT-B-32"]
    assert s.max_batch_size == 8 and s.offline is True
    assert s.batcher().max_batch_size == 8
    assert s.batcher().default_timeout_s == s.request_timeout_s


def test_arguments_override_environment(monkeypatch):
    monkeypatch.setenv("CLIP_PORT", "9000")
    assert Settings(port=9100).port == 9100


@pytest.mark.parametrize(
    "bad",
    [{"models": []}, {"models": ["a", "a"]}, {"max_batch_size": 0}, {"dtype": "int8"},
     {"port": 70000}, {"unknown_setting": 1}],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_idle_release_reaches_the_batcher(monkeypatch):
    monkeypatch.setenv("CLIP_RELEASE_AFTER_IDLE_S", "5")
    assert Settings().batcher().release_after_idle_s == 5.0
    monkeypatch.setenv("CLIP_RELEASE_AFTER_IDLE_S", "none")
    assert Settings().batcher().release_after_idle_s is None
