"""Self-Forcing's own causal Wan code, imported from a checkout beside the project (never vendored).

Found at ``SELF_FORCING_PATH`` or ``~/Self-Forcing``; imported through
:func:`wan_capture.adapters.causal_wan.self_forcing_modules` (its ``wan`` package ``__init__`` needs CUDA and ftfy,
and the official Wan code installs a ``wan`` package of its own, which is put back afterwards).
"""
import contextlib
import os

from wan_capture.adapters.causal_wan import self_forcing_modules as _modules

SF_NOT_FOUND = ("Self-Forcing NOT FOUND: set SELF_FORCING_PATH=<checkout of github.com/guandeh17/Self-Forcing> "
                "(or put it at ~/Self-Forcing) to run the self_forcing tests")


def self_forcing_path():
    for path in (os.environ.get("SELF_FORCING_PATH"), os.path.expanduser("~/Self-Forcing")):
        if path and os.path.isfile(os.path.join(path, "wan", "modules", "causal_model.py")):
            return path
    return None


@contextlib.contextmanager
def self_forcing_modules():
    """``(causal_model, model)`` of the checkout found by :func:`self_forcing_path`."""
    with _modules(self_forcing_path()) as mods:
        yield mods
