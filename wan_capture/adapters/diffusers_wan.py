"""diffusers' ``WanTransformer3DModel``: recording processors around the model's own attention processors.

Each block's ``attn1``/``attn2`` processor is wrapped (block and kind known, the original processor does the work);
the q/k tap sits at ``dispatch_attention_fn`` in diffusers' Wan module while the context is open. All are restored.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..capture.call import CROSS_IMAGE, CROSS_TEXT, SELF
from ..grid import Grid
from ..model_info import describe_model
from .session import Patches, PipelineTracker, recording_pass, timestep_of


def is_diffusers_wan(model) -> bool:
    return type(model).__name__ == "WanTransformer3DModel" and type(model).__module__.startswith("diffusers")


class RecordingProcessor:
    """Runs the original processor with the block and kind of its attention calls known to the session."""

    def __init__(self, inner, session: PipelineTracker, block: int, kinds):
        self.inner, self.session, self.block, self.kinds = inner, session, block, kinds

    def __call__(self, attn, *args, **kwargs):
        self.session.enter_block(self.block, self.kinds)
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            self.session.leave_block()


@contextmanager
def attach(model, recorder, branch_order=("cond", "uncond")):
    import diffusers.models.transformers.transformer_wan as tw
    info = describe_model(model, model_type="diffusers-WanTransformer3DModel")
    session = PipelineTracker(recorder, info, branch_order)
    original_dispatch = tw.dispatch_attention_fn

    def tapped(query, key, value, *args, **kwargs):
        return session.tap_bsnd(query, key, lambda: original_dispatch(query, key, value, *args, **kwargs))

    originals = dict(model.attn_processors)
    wrapped = {}
    for name, proc in originals.items():
        _, block, which = name.split(".")[:3]
        attn = getattr(model.blocks[int(block)], which)
        kinds = (SELF,) if which == "attn1" else (
            (CROSS_IMAGE, CROSS_TEXT) if getattr(attn, "add_k_proj", None) is not None else (CROSS_TEXT,))
        wrapped[name] = RecordingProcessor(proc, session, int(block), kinds)

    def pre_forward(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        pt, ph, pw = module.config.patch_size
        f, h, w = x.shape[-3:]
        session.begin_forward(timestep_of(t), x.shape[0], Grid(f // pt, h // ph, w // pw))

    patches = Patches()
    patches.hook(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
    patches.hook(model.register_forward_hook(lambda *a: session.end_evaluation()))
    model.set_attn_processor(wrapped)
    patches.on_undo(lambda: model.set_attn_processor(originals))
    patches.replace(tw, "dispatch_attention_fn", tapped)
    with recording_pass(recorder, info, patches.undo) as rec:
        yield rec
