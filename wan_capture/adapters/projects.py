"""The causal Wan projects' model code, imported from a checkout beside the project (never vendored).

Each project's package ``__init__`` pulls in much more than its model (CUDA calls, ftfy, tokenizers, training
code), so only the model modules are imported: empty packages are registered that point into the checkout.
Modules of the same names loaded before (another project's ``wan``, a ``utils`` of your own) are put back on exit.
"""
from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from typing import Dict, Iterator, Tuple


@dataclass(frozen=True)
class Project:
    """Where one project's causal Wan code lives in its checkout.

    Fields:
        name: the project's name, for messages.
        packages: package name -> folder in the checkout, registered empty (their ``__init__`` is not run).
        modules: the modules to import, in order: the causal model, then the module of its cross-attention.
        needs: the third-party packages its model code imports.
        marker: a file whose presence says the checkout is this project.
        unused_imports: ``(module, name)`` its code imports but never calls, which newer versions of the package
            dropped: while importing, a stand-in that raises is put there if the name is missing.
    """

    name: str
    packages: Dict[str, str]
    modules: Tuple[str, ...]
    needs: Tuple[str, ...]
    marker: str
    unused_imports: Tuple[Tuple[str, str], ...] = ()


_WAN = {"wan": "wan", "wan.modules": "wan/modules"}
_WAN_MODULES = ("wan.modules.causal_model", "wan.modules.model")
PROJECTS: Dict[str, Project] = {
    "self-forcing": Project("Self-Forcing", _WAN, _WAN_MODULES, ("diffusers", "einops"), "wan/modules/causal_model.py"),
    "causal-forcing": Project("Causal-Forcing", _WAN, _WAN_MODULES, ("diffusers", "einops"),
                              "wan/modules/causal_model.py"),
    "causal-forcing-long": Project("Causal-Forcing long_video", {k: "long_video/" + v for k, v in _WAN.items()},
                                   _WAN_MODULES, ("diffusers", "einops"), "long_video/wan/modules/causal_model.py"),
    "rolling-forcing": Project("Rolling Forcing", _WAN, _WAN_MODULES, ("diffusers", "einops"),
                               "wan/modules/causal_model.py"),
    "causvid": Project("CausVid", {"causvid": "causvid", "causvid.models": "causvid/models",
                                   "causvid.models.wan": "causvid/models/wan",
                                   "causvid.models.wan.wan_base": "causvid/models/wan/wan_base",
                                   "causvid.models.wan.wan_base.modules": "causvid/models/wan/wan_base/modules"},
                       ("causvid.models.wan.causal_model", "causvid.models.wan.wan_base.modules.model"),
                       ("diffusers", "einops"), "causvid/models/wan/causal_model.py"),
    "longlive": Project("LongLive", {"wan_5b": "wan_5b", "wan_5b.modules": "wan_5b/modules", "utils": "utils"},
                        ("wan_5b.modules.causal_model", "wan_5b.modules.causal_model"),
                        ("diffusers", "einops", "transformers"), "wan_5b/modules/causal_model.py",
                        # LongLive pins transformers<5, which still had it; its model never calls it
                        (("transformers.models.x_clip.modeling_x_clip", "x_clip_loss"),)),
}


@contextmanager
def _stand_ins(spec: Project) -> Iterator[None]:
    added = []
    for module_name, name in spec.unused_imports:
        try:
            module = import_module(module_name)
        except ImportError:
            continue
        if not hasattr(module, name):
            def stand_in(*args, _name=f"{module_name}.{name}", **kwargs):
                raise NotImplementedError(f"{_name} is not in the installed version; {spec.name} imports it unused")
            setattr(module, name, stand_in)
            added.append((module, name))
    try:
        yield
    finally:
        for module, name in added:
            delattr(module, name)


def _owned(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@contextmanager
def project_modules(path: str, project: str) -> Iterator[tuple]:
    """``(causal_model, cross_attention_module)`` of ``project`` (a key of :data:`PROJECTS`) from the checkout at
    ``path``; a missing third-party package is an ImportError that names what to install."""
    spec = PROJECTS[project]
    if not path or not os.path.isfile(os.path.join(path, spec.marker)):
        raise FileNotFoundError(f"{spec.name}: no {spec.marker} under {path!r}: give the path of a checkout")
    roots = {name.split(".")[0] for name in spec.packages}
    saved = {n: m for n, m in sys.modules.items() if _owned(n, roots)}
    for n in saved:
        del sys.modules[n]
    try:
        for name, sub in spec.packages.items():
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(path, *sub.split("/"))]
            sys.modules[name] = pkg
        try:
            with _stand_ins(spec):
                mods = tuple(import_module(m) for m in spec.modules)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if _owned(e.name or "", roots):
                raise
            raise ImportError(f"{spec.name}'s model code needs the package {top!r} (it imports "
                              f"{', '.join(spec.needs)}): pip install {' '.join(spec.needs)}") from e
        yield mods
    finally:
        for n in [n for n in sys.modules if _owned(n, roots)]:
            del sys.modules[n]
        sys.modules.update(saved)
