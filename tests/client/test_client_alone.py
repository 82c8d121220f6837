"""clip_client stands alone: it runs with torch, Pillow, tqdm and the server's packages
unimportable, and imports none of them when they are there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "clip_core", "service", "PIL", "tqdm", "fastapi",
         "pydantic", "starlette")

SCRIPT = textwrap.dedent("""
    import sys
    poison = sys.argv[1] == "poison"
    heavy = {heavy!r}
    if poison:
        for name in heavy:
            sys.modules[name] = None  # `import name` now raises ImportError
    import httpx, numpy as np
    from clip_client import Client

    def handler(request):
        if request.url.path == "/v1/limits":
            return httpx.Response(200, json={{"max_items_per_request": 2,
                                              "max_body_bytes": 1 << 20}})
        import json
        body = json.loads(request.content)
        import base64
        row = base64.b64encode(np.ones(4, "<f4").tobytes()).decode()
        return httpx.Response(200, json={{"texts": [{{"embedding": row}}] * len(body["texts"]),
                                          "images": []}})

    with Client("http://x", transport=httpx.MockTransport(handler), progress=True) as c:
        v = c.embed_texts(["a", "b", "c"])
    assert v.shape == (3, 4), v.shape
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in heavy
                    and sys.modules[n] is not None)
    print("LOADED", loaded)
""")


def _run(mode: str) -> str:
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), mode], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_it_works_with_the_heavy_packages_unimportable():
    assert "LOADED []" in _run("poison")


def test_it_imports_nothing_of_the_server_when_everything_is_installed():
    out = _run("plain")
    loaded = out.split("LOADED", 1)[1]
    # tqdm draws the asked-for bar when installed (which shows this check sees imports);
    # nothing else of the list is touched.
    assert "'tqdm'" in loaded, out
    for name in HEAVY:
        if name != "tqdm":
            assert f"'{name}" not in loaded, out
