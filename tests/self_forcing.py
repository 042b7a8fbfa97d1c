"""Self-Forcing's own causal Wan code, imported from a checkout beside the project (never vendored).

Found at ``SELF_FORCING_PATH`` or ``~/Self-Forcing``. Importing its ``wan`` package runs CUDA calls and needs
``ftfy``; instead empty ``wan`` and ``wan.modules`` packages point into the checkout and only
``wan.modules.causal_model`` is imported. The official Wan code (``wan22``) also installs a ``wan`` package, so the
import happens inside :func:`self_forcing_modules`, which puts back whatever ``wan`` modules were there before.
"""
import contextlib
import os
import sys
import types


SF_NOT_FOUND = ("Self-Forcing NOT FOUND: set SELF_FORCING_PATH=<checkout of github.com/guandeh17/Self-Forcing> "
                "(or put it at ~/Self-Forcing) to run the self_forcing tests")


def self_forcing_path():
    for path in (os.environ.get("SELF_FORCING_PATH"), os.path.expanduser("~/Self-Forcing")):
        if path and os.path.isfile(os.path.join(path, "wan", "modules", "causal_model.py")):
            return path
    return None


@contextlib.contextmanager
def self_forcing_modules():
    """``(causal_model, model)``: Self-Forcing's ``wan.modules.causal_model`` and ``wan.modules.model``."""
    root = self_forcing_path()
    saved = {name: mod for name, mod in sys.modules.items() if name == "wan" or name.startswith("wan.")}
    for name in saved:
        del sys.modules[name]
    try:
        for name, path in (("wan", os.path.join(root, "wan")), ("wan.modules", os.path.join(root, "wan", "modules"))):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        import wan.modules.causal_model as causal_model
        import wan.modules.model as model
        yield causal_model, model
    finally:
        for name in [n for n in sys.modules if n == "wan" or n.startswith("wan.")]:
            del sys.modules[name]
        sys.modules.update(saved)
