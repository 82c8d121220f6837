"""Texts of arbitrary Unicode (NUL, lone surrogates, zero-width, right-to-left, noise)
never make a 5xx; the over-length policy is truncate-and-flag, or 422 when strict."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from refusals import LEAK, metric, refused, served, serving, tiny_checkpoint

# Any code point, with the troublesome ones drawn often: NUL, zero-width, bidi controls,
# BOM, combining marks, and (half the time) lone surrogates, which JSON can carry as
# \ud800 escapes though UTF-8 cannot.
_CHARS = st.characters(codec=None)
_SPECIAL = st.sampled_from(["\x00", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff",
                            "\u202e", "\u202d", "\u200f", "\u061c", "\u0301", "\ufffd",
                            "\U0010ffff", "\x1b"])
_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
ANY_TEXT = (st.text(_CHARS | _SPECIAL, max_size=300)
            | st.text(_CHARS | _SPECIAL | _SURROGATE, max_size=60))
TRICKY = ["\x00", "a\x00b", "\ud800", "x\udfffy", "\u200b\u200c\u200d\ufeff",
          "\u202eevil\u202c", "مرحبا بالعالم", "שלום", "e\u0301" * 50, "<|endoftext|>",
          "<start_of_text>", "\U0001f600" * 40, "\t\n\r ", "\ufffd", "\x7f\x80\x9f"]
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
OK_4XX = {"invalid_text", "text_too_long", "invalid_request"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serving(tiny_checkpoint(tmp_path_factory.mktemp("m")), max_text_chars=200) as c:
        yield c


def _post(client, path: str, body: dict):
    # json.dumps escapes lone surrogates as \udXXX, as a hostile client would send them.
    return client.post(path, content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})


def _check(r, n: int | None = None) -> None:
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        if n is not None:
            texts = r.json()["texts"]
            assert len(texts) == n and all(t["n_tokens"] >= 2 for t in texts)
        return
    error = r.json()["error"]
    assert error["type"] in OK_4XX, error
    assert not LEAK.search(r.text)


@FUZZ
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=4))
@example(texts=TRICKY[:4])
@example(texts=TRICKY[4:8])
@example(texts=TRICKY[8:12])
@example(texts=TRICKY[12:])
def test_embed_any_unicode_is_never_5xx(client, texts):
    _check(_post(client, "/embed", {"texts": texts}), len(texts))


@FUZZ
@given(text=ANY_TEXT, strict=st.booleans())
def test_openai_and_strict_mode_any_unicode_is_never_5xx(client, text, strict):
    _check(_post(client, "/v1/embeddings", {"input": [text]}))
    _check(_post(client, "/embed", {"texts": [text], "truncate": not strict}))


@FUZZ
@given(labels=st.lists(ANY_TEXT, min_size=1, max_size=3, unique=True),
       template=st.none() | ANY_TEXT.map(lambda t: t + " {}"))
def test_classify_labels_and_templates_any_unicode_is_never_5xx(client, labels, template):
    from refusals import b64, png
    body = {"images": [b64(png())], "labels": labels}
    if template is not None:
        body["templates"] = [template]
    r = _post(client, "/classify", body)
    assert r.status_code < 500, r.text


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
def test_form_text_fields_of_any_bytes_are_never_5xx(client, raw):
    body = (b'--b0\r\nContent-Disposition: form-data; name="texts"\r\n\r\n' + raw
            + b"\r\n--b0--\r\n")
    r = client.post("/embed", content=body,
                    headers={"content-type": "multipart/form-data; boundary=b0"})
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("text", ["\ud800", "ok \udc00 ok"])
def test_lone_surrogates_are_422_invalid_text(client, text):
    r = refused(client, lambda: _post(client, "/embed", {"texts": ["fine", text]}), 422,
                "invalid_text")
    assert "text 1" in r.json()["error"]["message"]


def test_over_length_texts_are_truncated_and_flagged_or_422_when_strict(client):
    over = "a b c d e f g h i j " * 9  # 180 characters (under the cap), 92 tokens
    body = _post(client, "/embed", {"texts": [over, "short"]}).json()
    assert [(t["truncated"], t["n_tokens"]) for t in body["texts"]] == [(True, 92), (False, 3)]
    before = metric(client, "clip_errors_total", type="text_too_long")
    r = _post(client, "/embed", {"texts": ["ok", over], "truncate": False})
    assert r.status_code == 422 and r.json()["error"]["type"] == "text_too_long"
    assert "text 1 needs 92 tokens" in r.json()["error"]["message"]
    assert "a b c" not in r.text
    assert metric(client, "clip_errors_total", type="text_too_long") == before + 1
    served(client)
