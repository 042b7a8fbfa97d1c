"""The recorder's attention override inside ComfyUI's attention dispatch (``wrap_attn``), whatever else is there.

* **Chaining** (core's convention, ``comfy_extras/nodes_sparse_attention.py``): the recorder calls the override that
  was on the hook under it, and puts itself back on top at every ``ON_PREPARE_STATE`` (ComfyUI of 2026 passes the
  evaluation's ``model_options`` there) and on each evaluation's own options, so a node applied after
  Attach (Model Attention Backend, block-sparse attention, any pack) cannot silently unhook it. A node that chained
  onto the recorder calls it again from inside: that inner call passes straight through (to what was under the
  recorder at Attach), so nothing is recorded twice and the model computes what it would have without the recorder.
* **Per-module backends** (ComfyUI of 2026: an attention module's ``comfy_attention.function``, e.g. comfy-kitchen
  int8 loaded with the checkpoint): ``wrap_attn`` drops the module's preference whenever an override is on the
  hook, so the recorder calls the module's function itself. Which module is running is known from forward hooks on
  the modules that carry one, added for one evaluation.
* **Tensor containers** (ComfyUI of 2026's ``AttentionTensorContainer``, consumed by the kernel so q/k/v can be freed
  while it runs): the override has a ``container_function``. It records from the containers' tensors first, lets
  go of them, then hands the containers to the kernel the model would have called, so they are not held longer
  than on the model's own path.

Statistics are always of exact softmax attention of the q and k the kernel received (float32); the summary's
``attention`` says which kernel computed the model's output.
"""
from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import Callable, List, Optional

OVERRIDE_KEY = "optimized_attention_override"
INSIDE = "_inside_attn_wrapper"  # wrap_attn's mark: a call carrying it skips the override and the module preference


def module_backend(module):
    """The attention function an attention module carries (ComfyUI 2026's ``comfy_attention``), or None."""
    return getattr(getattr(module, "comfy_attention", None), "function", None)


def _name(fn) -> str:
    fn = getattr(fn, "__wrapped__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class Dispatch:
    """One recorder installation's place on the hook (see the module docstring). Each install puts a new override
    on top of whatever is on the hook of that ``transformer_options`` (core's ``install_override``): the override
    carries its own ``previous``, so two graphs sharing the Attach node never call each other's kernels."""

    def __init__(self, base: Optional[Callable], backend_modules: List, make: Callable):
        self.base = base  # the override that was on the hook at Attach
        self.make = make  # previous -> the recorder's override calling it
        # the recorder's overrides on some hook now (weak: one is made per evaluation while another node re-asserts
        # its own each step, and goes with that evaluation's options)
        self.installed = weakref.WeakSet()
        self.depth = 0  # > 0 while one of the recorder's overrides runs: a call back into one passes through
        self.backend_modules = backend_modules  # modules of the model that carry their own attention function
        self.module = None  # the one of them running now
        self.kernels: set = set()  # what computed the model's attention in the pass (for the summary)

    # -- the hook ------------------------------------------------------------------------------------
    def install(self, transformer_options: Optional[dict]) -> None:
        """Put the recorder on top of the hook, calling whatever is there now; idempotent once it is on top."""
        if transformer_options is None:
            return
        current = transformer_options.get(OVERRIDE_KEY)
        if current in self.installed:
            return
        override = self.make(current)
        self.installed.add(override)
        transformer_options[OVERRIDE_KEY] = override

    def under(self, previous: Optional[Callable]) -> Optional[Callable]:
        """The override a call goes on to: the inner call of a node chained onto the recorder goes to what was
        under the recorder at Attach (as it would have without the recorder)."""
        return self.base if self.depth > 1 else previous

    def plain(self, previous: Optional[Callable]) -> bool:
        """Nothing but the model's global kernel computes this call (the log-sum-exp may come from it)."""
        return self.under(previous) is None and module_backend(self.module) is None

    def note(self, previous: Optional[Callable]) -> None:
        """Remember which kernel computes this (outer) call, for the summary."""
        if previous is not None:
            self.kernels.add(f"another attention override, called under the recorder: {_name(previous)}")
        elif module_backend(self.module) is not None:
            self.kernels.add(f"the attention module's own backend: {_name(module_backend(self.module))}")
        else:
            self.kernels.add("the model's own attention call")

    def describe(self) -> dict:
        """Which kernels computed the model's attention in this pass, for the summary."""
        return {"statistics": "exact softmax attention of the q and k the kernel received, in float32",
                "kernels": sorted(self.kernels)}

    # -- the kernel the model would have called ----------------------------------------------------------
    def attend(self, previous, func, args: tuple, kwargs: dict):
        """Tensors: the override under the recorder, else the running module's function, else ``func``."""
        under = self.under(previous)
        if under is not None:
            return under(func, *args, **kwargs)
        fn = module_backend(self.module)
        return (fn or func)(*args, **kwargs)

    def attend_containers(self, previous, args: tuple, kwargs: dict):
        """Containers, as ``wrap_attn`` would hand them on without the recorder."""
        under = self.under(previous)
        if under is not None:
            handed = getattr(under, "container_function", None)
            if handed is not None:
                return handed(*args, **kwargs)
            tensors = tuple(c.take() for c in args[:3]) + tuple(args[3:])
            return under(self.dispatcher(), *tensors, **kwargs)
        fn = module_backend(self.module)
        if fn is not None:
            return fn(*args, **kwargs)
        return self.dispatcher()(*args, **{**kwargs, INSIDE: True})  # its container path (or take and compute)

    @staticmethod
    def dispatcher():
        """The ``optimized_attention`` of ComfyUI's attention module (the one Wan's attention calls)."""
        return sys.modules["comfy.ldm.modules.attention"].optimized_attention

    # -- per-module backends ----------------------------------------------------------------------------
    @contextmanager
    def module_hooks(self):
        """For one evaluation: which backend-carrying module is running."""
        handles = []

        def enter(module):
            def hook(*_):
                self.module = module
            return hook

        def leave(*_):
            self.module = None
        try:
            for m in self.backend_modules:
                handles.append(m.register_forward_pre_hook(enter(m)))
                handles.append(m.register_forward_hook(leave))
            yield
        finally:
            self.module = None
            for h in handles:
                h.remove()


def backend_modules(dm) -> List:
    """The modules of ``dm`` that carry their own attention function (empty before ComfyUI 2026)."""
    return [m for m in dm.modules() if module_backend(m) is not None] if dm is not None else []
