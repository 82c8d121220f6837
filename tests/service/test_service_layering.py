"""The service's layers point one way (STYLE.md): status codes live in one module, the
batching core imports neither torch nor the HTTP framework, clip_core nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
STATUS_MODULE = SERVICE / "api" / "errors.py"


def _status_literals(path: Path) -> list[int]:
    """Integer literals that look like HTTP error statuses (400-599)."""
    tree = ast.parse(path.read_text())
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and type(n.value) is int and 400 <= n.value <= 599]


def _status_keywords(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(isinstance(n, ast.keyword) and n.arg == "status_code"
               for n in ast.walk(tree))


def test_http_status_codes_appear_in_exactly_one_module():
    http_layer = [*(SERVICE / "api").glob("*.py"), SERVICE / "app.py", SERVICE / "__main__.py"]
    offenders = {
        str(p.relative_to(SERVICE)): codes
        for p in http_layer
        if p != STATUS_MODULE and (codes := _status_literals(p))
    }
    assert not offenders, f"status codes outside api/errors.py: {offenders}"
    keywords = {str(p.relative_to(SERVICE)): k for p in SERVICE.rglob("*.py")
                if p != STATUS_MODULE and (k := _status_keywords(p))}
    assert not keywords, f"status_code= outside api/errors.py: {keywords}"
    assert _status_literals(STATUS_MODULE)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.add(n.module.split(".")[0])
    return names


def test_core_modules_do_not_import_the_http_layer():
    http = {"fastapi", "starlette", "uvicorn"}
    # Every module below the HTTP layer, so a unit split out later is covered too.
    below = sorted(p.name for p in SERVICE.glob("*.py")
                   if p.name not in ("app.py", "__main__.py", "__init__.py"))
    assert {"worker.py", "dispatch.py", "scheduler.py", "core.py", "models.py"} <= set(below)
    for name in below:
        assert not (_imports(SERVICE / name) & http), name
        assert "from .api" not in (SERVICE / name).read_text(), name
