"""clip_client stands alone: it runs with torch, Pillow, tqdm and the server's packages
unimportable, imports none of them when they are there, and its own folder builds a wheel
that asks for httpx and numpy only and works installed by itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
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
    import clip_client
    print("FROM", clip_client.__file__)
""")


def _run(mode: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), mode], cwd=cwd,
                       capture_output=True, text=True, timeout=60, env=env)
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


def test_its_folder_builds_a_wheel_that_needs_only_httpx_and_numpy(tmp_path):
    source = tmp_path / "src" / "clip_client"  # a copy: building writes egg-info beside it
    shutil.copytree(ROOT / "clip_client", source,
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=120)
    wheel, = wheels.glob("clip_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    assert sorted(r for r in requires if "extra ==" not in r) == ["httpx>=0.25", "numpy>=1.24"]
    assert "clip_client/py.typed" in names
    assert not any(n.startswith(("clip_core/", "service/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=120)
    # Run from elsewhere, with the installed copy first: the checkout's is not importable.
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    out = _run("poison", cwd=elsewhere, env=env)
    assert "LOADED []" in out
    assert f"FROM {site / 'clip_client' / '__init__.py'}" in out, out
