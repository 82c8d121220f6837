"""schemathesis against the service's own OpenAPI schema, on a real server on 127.0.0.1
(uvicorn in a thread) with a tiny model: valid and invalid requests generated from the
schema never crash the service, and every response (status, content type, headers, body)
is one the schema documents. Examples are bounded so the run takes seconds.

"Never crash": no 5xx but the two the API promises for load and time, 503 and 504 (a
generated X-Request-Timeout of 5e-324 s is rightly a 504 deadline_exceeded)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from refusals import tiny_checkpoint
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings


@schemathesis.check
def no_crash(ctx, response, case):
    if response.status_code >= 500:
        kind = response.json().get("error", {}).get("type")
        if (response.status_code, kind) not in {(503, "overloaded"), (503, "unavailable"),
                                                (504, "deadline_exceeded")}:
            raise AssertionError(f"server error {response.status_code}: {response.text}")


CHECKS = [no_crash, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]

# The schema is the app's own, read at import (building it loads no model); the model
# loads when the server below starts, before any generated request is sent.
_FOLDER = Path(tempfile.mkdtemp(prefix="schema-fuzz-"))
APP = create_app(Settings(models=[str(_FOLDER / "tiny.safetensors")], log_format="text",
                          max_items_per_request=32))
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def base_url():
    tiny_checkpoint(_FOLDER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=port,
                                           log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        shutil.rmtree(_FOLDER, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_the_api_honours_its_own_schema(case, base_url):
    case.call_and_validate(base_url=base_url, checks=CHECKS)
