"""Small helpers the node definitions share: settings with their defaults, and how index lists read."""
from __future__ import annotations

from comfy_api.latest import io


def settings(cls: type[io.ComfyNode], given: dict) -> dict:
    """The node's widget values: those given, the schema's defaults for the rest.

    Only the essential inputs of a node are required; an API prompt may leave every other out, and a left-out
    value is the default the frontend would show (one place defines it: the schema).
    """
    out = dict(given)
    for inp in cls.GET_SCHEMA().inputs:
        if inp.id not in out and getattr(inp, "default", None) is not None:
            out[inp.id] = inp.default
    return out


def steps_input(what: str, default: str = "all") -> io.String.Input:
    return io.String.Input("steps", default=default, optional=True,
                           tooltip=f"Steps to {what}: 'all', a list like '0-9,20', or 'every 5'. Step 0 is the first "
                                   "model evaluation at the highest noise.")
