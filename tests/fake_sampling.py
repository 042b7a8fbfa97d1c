"""A hand-driven sampling loop over random q and k: the recorder without any model."""
import torch

from wan_capture import AttentionCall, Grid, Recorder

GRID = Grid(2, 3, 4)  # 24 tokens
HEADS, D, TEXT = 3, 8, 10
MODEL = {"num_blocks": 3, "num_heads": HEADS}


def run(plan, steps=2, blocks=3, branches=("uncond", "cond"), seed=0, sigmas=None, grid=None, batch=1):
    """Drive a recorder like a sampler would; returns the recorder and every (step, block, kind) q/k used.

    Rows are ``batch`` videos per branch, branches in the order given (ComfyUI's chunk order).
    """
    grid = grid or GRID
    rec = Recorder(plan)
    g = torch.Generator().manual_seed(seed)
    sigmas = sigmas or [1.0 - i / steps for i in range(steps + 1)]
    model = dict(MODEL, num_blocks=max(MODEL["num_blocks"], blocks), vae_stride=[4, 8, 8], patch_size=[1, 2, 2])
    rec.begin_pass(sigmas, model, sampling={"seed": 999, "cfg": 6.5})
    rows = tuple(b for b in branches for _ in range(batch))
    seen = {}
    for s, sigma in enumerate(sigmas[:-1]):
        step, exact = rec.locate(sigma)
        assert (step, exact) == (s, True)
        for b in range(blocks):
            x = torch.randn(len(rows), grid.tokens, HEADS * D, generator=g)
            kx = torch.randn(len(rows), grid.tokens, HEADS * D, generator=g)
            ctx = torch.randn(len(rows), TEXT, HEADS * D, generator=g)
            for kind, k in (("self", kx), ("cross_text", ctx)):
                call = AttentionCall(b, kind, step, sigma, rows, grid, HEADS, timestep=sigma * 1000)
                out = rec.tap(call, x, k, lambda: x * 2)
                assert torch.equal(out, x * 2)
                seen[(s, b, kind)] = (x, k)
    rec.end_pass(output_fingerprint="out")
    return rec, seen


def heads_of(x):
    return x.view(x.shape[0], x.shape[1], HEADS, D).transpose(1, 2)


