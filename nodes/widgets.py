"""Small helpers the node definitions share: settings with their defaults, and how index lists read."""
from __future__ import annotations

from comfy_api.latest import io


def settings(cls: type[io.ComfyNode], given: dict) -> dict:
    """The node's widget values: those given, the schema's defaults for the rest.

    Only the essential inputs of a node are required; an API prompt may leave every other out, and a left-out
    value is the default the frontend would show (one place defines it: the schema).
    """
    out = dict(given)
    for name, value in _defaults(cls).items():
        out.setdefault(name, value)
    return out


_DEFAULTS: dict = {}


def _defaults(cls: type[io.ComfyNode]) -> dict:
    # define_schema(), not GET_SCHEMA(): the class ComfyUI executes is a locked clone that must not be written to
    schema = cls.define_schema()
    if schema.node_id not in _DEFAULTS:
        _DEFAULTS[schema.node_id] = {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}
    return _DEFAULTS[schema.node_id]


def steps_input(what: str, default: str = "all") -> io.String.Input:
    return io.String.Input("steps", default=default, optional=True,
                           tooltip=f"Steps to {what}: 'all', a list like '0-9,20', or 'every 5'. Step 0 is the first "
                                   "model evaluation at the highest noise.")
