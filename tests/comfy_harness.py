"""Test-side access to real ComfyUI: skips loudly when it is not found."""
import pytest

from devtools.tiny_comfy import *  # noqa: F401,F403
from devtools.tiny_comfy import COMFYUI, NOT_FOUND

needs_comfy = pytest.mark.skipif(COMFYUI is None, reason=NOT_FOUND)
