"""API keys, per-key rate limits, CORS, and error bodies that give nothing away."""

from __future__ import annotations

import hashlib

import pytest
from refusals import LEAK, b64, metric, png, refused, served, serving, tiny_checkpoint

from service.api.access import key_id
from service.ratelimit import RateLimiter
from service.settings import Settings

KEY_A = "a" * 24 + "-key-one"
KEY_B = "b" * 24 + "-key-two"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}

INFERENCE = [
    ("POST", "/embed", {"texts": ["x"]}),
    ("POST", "/classify", {"images": [b64(png())], "labels": ["a", "b"]}),
    ("POST", "/similarity", {"queries": {"texts": ["a"]}, "candidates": {"texts": ["b"]}}),
    ("POST", "/v1/embeddings", {"input": "x"}),
    ("GET", "/v1/models", None),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def client(checkpoint):
    with serving(checkpoint, api_keys=[KEY_A, KEY_B]) as c:
        yield c


def _call(client, method, path, body, headers=None):
    return client.request(method, path, json=body, headers=headers or {})


@pytest.mark.parametrize(("method", "path", "body"), INFERENCE)
def test_every_inference_route_needs_a_key(client, method, path, body):
    r = refused(client, lambda: _call(client, method, path, body), 401, "unauthorized",
                headers=A)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error=" not in r.headers["WWW-Authenticate"]  # none was presented
    for bad in ({"Authorization": "Bearer wrong-key-of-enough-length"},
                {"Authorization": f"Basic {KEY_A}"}, {"Authorization": "Bearer "},
                {"Authorization": f"Bearer {KEY_A}x"}, {"Authorization": f"Bearer {KEY_A[:-1]}"}):
        r = refused(client, lambda h=bad: _call(client, method, path, body, h), 401,
                    "unauthorized", headers=A)
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"] or "Basic" in str(bad)
        assert KEY_A not in r.text
    assert _call(client, method, path, body, A).status_code == 200
    assert _call(client, method, path, body, B).status_code == 200


def test_an_unknown_path_needs_a_key_too(client):
    assert client.get("/nothing-here").status_code == 401
    assert client.get("/nothing-here", headers=A).status_code == 404


def test_probes_and_the_description_stay_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/metrics").status_code == 200  # metrics_auth is off by default


def test_metrics_can_require_a_key(checkpoint):
    with serving(checkpoint, api_keys=[KEY_A], metrics_auth=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=A).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_keys_are_compared_in_constant_time_over_digests():
    # What the code promises, checked on its shape: every key is compared, via SHA-256
    # digests (equal lengths), with hmac.compare_digest.
    import inspect

    from service.api import access
    source = inspect.getsource(access.Access._identify)
    assert "compare_digest" in source and "sha256" in source and "return" not in \
        source.split("for known")[1].split("return found")[0]
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8]


def test_short_keys_and_rate_limits_without_keys_are_refused_at_start():
    with pytest.raises(ValueError):
        Settings(api_keys=["short"])
    with pytest.raises(ValueError):
        Settings(rate_limit_per_s=5)
    assert [k.get_secret_value() for k in Settings(api_keys=f"{KEY_A}, {KEY_B}").api_keys] \
        == [KEY_A, KEY_B]


def test_each_key_has_its_own_rate_limit(checkpoint):
    with serving(checkpoint, api_keys=[KEY_A, KEY_B], rate_limit_per_s=0.5,
                 rate_limit_burst=3) as c:
        for _ in range(3):
            assert c.post("/embed", json={"texts": ["x"]}, headers=A).status_code == 200
        before = metric(c, "clip_errors_total", type="rate_limited")
        r = c.post("/embed", json={"texts": ["x"]}, headers=A)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        assert metric(c, "clip_errors_total", type="rate_limited") == before + 1
        # Another key is not held back by the first, and probes are never limited.
        assert c.post("/embed", json={"texts": ["x"]}, headers=B).status_code == 200
        assert all(c.get("/healthz").status_code == 200 for _ in range(5))


def test_a_token_bucket_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert limiter.take("k") == 0 and limiter.take("k") == 0
    assert limiter.take("k") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.take("k") == 0
    assert limiter.take("other") == 0


def test_cors_is_off_by_default(client):
    r = client.options("/embed", headers={"Origin": "https://evil.example",
                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/embed", json={"texts": ["x"]}, headers={**A, "Origin": "https://x.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_enabled_allows_exactly_the_listed_origins(checkpoint):
    with serving(checkpoint, cors_origins=["https://app.example"], api_keys=[KEY_A]) as c:
        pre = c.options("/embed", headers={"Origin": "https://app.example",
                                           "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/embed", headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "POST"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        r = c.post("/embed", json={"texts": ["x"]},
                   headers={**A, "Origin": "https://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"


SECRET = "s3cr3t-marker-Zq"


@pytest.mark.parametrize("body", [
    {"texts": [SECRET], "model": SECRET},
    {"texts": [SECRET], SECRET: 1},
    {"texts": SECRET},
    {"texts": [SECRET], "encoding": SECRET},
    {"images": [SECRET]},
    {"images": ["data:" + SECRET + ";base64,AAAA"]},
    {"images": [b64(SECRET.encode() * 10)]},
    {"texts": [SECRET * 1000]},
])
def test_error_bodies_never_echo_the_input(checkpoint, body):
    with serving(checkpoint, max_text_chars=100) as c:
        r = c.post("/embed", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert SECRET not in r.text and not LEAK.search(r.text), r.text
        served(c)


def test_an_unexpected_exception_is_a_bare_500(checkpoint, monkeypatch):
    with serving(checkpoint) as c:
        engine = c.app.state.engine

        def broken(*args, **kwargs):
            raise KeyError(f"internal detail {SECRET}")

        monkeypatch.setattr(engine, "model", broken)
        r = c.post("/embed", json={"texts": ["x"]})
        assert r.status_code == 500
        assert r.json() == {"error": {"type": "internal_error", "message": "internal error"}}
        assert metric(c, "clip_errors_total", type="internal_error") >= 1
        monkeypatch.undo()
        served(c)


def test_invalid_settings_are_reported_without_their_values(monkeypatch, capsys):
    from service.__main__ import main
    monkeypatch.setenv("CLIP_API_KEYS", "tooshort-Zq9")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "api_keys" in err and "tooshort-Zq9" not in err
