"""The causal Wan projects' own code, imported from checkouts beside the project (never vendored).

Each is found at its environment variable or in the home folder; absent, its tests skip with one loud line.
Imported through :func:`wan_capture.adapters.projects.project_modules`.
"""
import contextlib
import os

import pytest
import torch

from wan_capture.adapters.official import sdpa_attention
from wan_capture.adapters.projects import PROJECTS, project_modules

# project key -> (environment variable, folder under ~)
LOCATIONS = {
    "self-forcing": ("SELF_FORCING_PATH", "Self-Forcing"),
    "causal-forcing": ("CAUSAL_FORCING_PATH", "Causal-Forcing"),
    "causal-forcing-long": ("CAUSAL_FORCING_PATH", "Causal-Forcing"),
    "causvid": ("CAUSVID_PATH", "CausVid"),
    "longlive": ("LONGLIVE_PATH", "LongLive"),
    "rolling-forcing": ("ROLLING_FORCING_PATH", "RollingForcing"),
}


def not_found(project: str) -> str:
    var, folder = LOCATIONS[project]
    return (f"{PROJECTS[project].name} NOT FOUND: set {var}=<checkout> (or put it at ~/{folder}) to run its tests")


def project_path(project: str):
    var, folder = LOCATIONS[project]
    for path in (os.environ.get(var), os.path.expanduser(f"~/{folder}")):
        if path and os.path.isfile(os.path.join(path, PROJECTS[project].marker)):
            return path
    return None


def needs(project: str):
    return pytest.mark.skipif(project_path(project) is None, reason=not_found(project))


@contextlib.contextmanager
def modules(project: str, monkeypatch):
    """``(causal_model, cross-attention module)`` of the project, set up for a CPU: SDPA for flash-attn where the
    project's code has no fallback, and LongLive's Triton kernels switched off by its own module flags."""
    with project_modules(project_path(project), project) as (cm, wm):
        monkeypatch.setattr(wm, "flash_attention", sdpa_attention)
        for flag in ("_TRITON_ROPE_ENABLED", "_TRITON_ADALN_ENABLED"):
            if hasattr(cm, flag):
                monkeypatch.setattr(cm, flag, False)
        yield cm, wm


def tiny(cm, **kwargs):
    """A tiny ``CausalWanModel`` of the project (2 blocks of 2 heads of 128), in bf16 as the projects run."""
    torch.manual_seed(0)
    return cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                             freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2,
                             **kwargs).eval().to(torch.bfloat16)
