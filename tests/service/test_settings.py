from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from clip_core.config import DECODE_FORMATS
from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


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


def _readme_defaults() -> dict[str, str]:
    """`SETTING` -> the default the README's tables state for it (the next cell)."""
    out = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for cell, default in itertools.pairwise(cells):
            if (m := re.fullmatch(r"`([A-Z_]+)`", cell)) and m[1].lower() in Settings.model_fields:
                out[m[1]] = default
    return out


def _parse_default(text: str) -> object:
    """README's way of writing a default as a value: 256, 2.0, 32 MiB, 2²⁶ (8192²), A,B,C."""
    if text in ("true", "false"):
        return text == "true"
    if m := re.fullmatch(r"`([a-z_]+)`", text):  # one of a Literal's choices
        return m[1]
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if m := re.fullmatch(r"(\d+) MiB", text):
        return int(m[1]) * 2**20
    if m := re.match(r"2([⁰¹²³⁴⁵⁶⁷⁸⁹]+)", text):
        return 2 ** int(m[1].translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")))
    if m := re.match(r"[A-Z0-9]+(,[A-Z0-9]+)+\b", text):
        return m[0].split(",")
    return None


def test_the_readme_states_the_settings_defaults():
    stated = _readme_defaults()
    assert {"MAX_ITEMS_PER_REQUEST", "MAX_BODY_BYTES", "IMAGE_FORMATS"} <= stated.keys()
    in_words = set()
    for name, text in stated.items():
        value = _parse_default(text)
        if value is None:
            in_words.add(name)
            continue
        default = Settings.model_fields[name.lower()].get_default(call_default_factory=True)
        assert value == default, f"README says {name} defaults to {text}; it is {default}"
    # Defaults described rather than stated (computed at start-up).
    assert in_words == {"STREAMS"}


def test_image_formats_have_one_source():
    default = Settings.model_fields["image_formats"].get_default(call_default_factory=True)
    assert default == list(DECODE_FORMATS)
    assert Settings(image_formats="png,gif").image_formats == ["PNG", "GIF"]
    with pytest.raises(ValidationError, match="subset of"):
        Settings(image_formats=["EPS"])


@pytest.mark.parametrize("given, kept", [
    ("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
    ("cuda:all", "cuda:all"), ("cuda:0, cuda:1", "cuda:0,cuda:1"), ("cpu,cpu", "cpu,cpu"),
    ("CUDA:0,cpu", "cuda:0,cpu"),
])
def test_devices_are_one_or_a_comma_list(given, kept):
    assert Settings(device=given).device == kept


@pytest.mark.parametrize("bad", [
    "gpu", "cuda:", "cuda:-1", "cuda:x", "mps", "", "cpu,", "auto,cpu", "cuda:all,cpu",
    "cuda:0,cuda:0", "cuda,cuda:0",
])
def test_unknown_or_repeated_devices_are_refused(bad):
    with pytest.raises(ValidationError, match="device"):
        Settings(device=bad)


def test_devices_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIP_DEVICE", "cuda:0,cuda:1")
    assert Settings().device == "cuda:0,cuda:1"
