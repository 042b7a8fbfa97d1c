"""The pack root and tests/ are on sys.path through pyproject.toml's pytest ``pythonpath``."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from devtools.tiny_comfy import COMFYUI, NOT_FOUND
from self_forcing import SF_NOT_FOUND, self_forcing_path
from causal_projects import LOCATIONS, not_found, project_path


def pytest_report_header(config):
    return f"ComfyUI: {COMFYUI}" if COMFYUI else NOT_FOUND


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = sum("ComfyUI NOT FOUND" in str(r.longrepr) for r in terminalreporter.stats.get("skipped", []))
    if COMFYUI is None and skipped:
        terminalreporter.write_line(f"!!! {NOT_FOUND} ({skipped} ComfyUI tests skipped) !!!", red=True, bold=True)
    sf_skipped = sum("Self-Forcing NOT FOUND" in str(r.longrepr) for r in terminalreporter.stats.get("skipped", []))
    if self_forcing_path() is None and sf_skipped:
        terminalreporter.write_line(f"!!! {SF_NOT_FOUND} ({sf_skipped} Self-Forcing tests skipped) !!!", red=True,
                                    bold=True)
    from devtools.comfy_ar import AR_NOT_FOUND
    ar_skipped = sum(AR_NOT_FOUND in str(r.longrepr) for r in terminalreporter.stats.get("skipped", []))
    if ar_skipped:
        terminalreporter.write_line(f"!!! {AR_NOT_FOUND} ({ar_skipped} tests skipped) !!!", red=True, bold=True)
    for project in LOCATIONS:
        if project == "self-forcing" or project_path(project) is not None:
            continue
        message = not_found(project)
        n = sum(message in str(r.longrepr) for r in terminalreporter.stats.get("skipped", []))
        if n:
            terminalreporter.write_line(f"!!! {message} ({n} tests skipped) !!!", red=True, bold=True)


import types  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real headless ComfyUI with this pack and the tiny-model helper nodes, for API-level tests."""
    if COMFYUI is None:
        pytest.skip(NOT_FOUND)
    import devtools.comfy_server as cs
    base = tmp_path_factory.mktemp("comfy_base")
    proc, url, log = cs.start(COMFYUI, str(base))
    yield types.SimpleNamespace(url=url, base=base, output=base / "output", log=log, pid=proc.pid)
    cs.stop(proc)


def needs_comfyui(item) -> bool:
    """A test of ComfyUI: it skips without it (needs_comfy) or runs a server (comfy_server)."""
    if "comfy_server" in getattr(item, "fixturenames", ()):
        return True
    return any(m.kwargs.get("reason") == NOT_FOUND for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    """WAN_CAPTURE_COMFYUI_ONLY=1: only the ComfyUI tests (the run against a second ComfyUI tree, whose Python has
    ComfyUI's packages, not necessarily the core tests' official Wan code or diffusers)."""
    if os.environ.get("WAN_CAPTURE_COMFYUI_ONLY") != "1":
        return
    keep = [i for i in items if needs_comfyui(i)]
    config.hook.pytest_deselected(items=[i for i in items if not needs_comfyui(i)])
    items[:] = keep
