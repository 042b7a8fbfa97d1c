"""First recording in one command: a tiny random Wan model sampled through real ComfyUI with the recorder attached.

    python scripts/demo.py [--out DIR]

Builds a tiny Wan 2.1 checkpoint (no weights are downloaded), samples 9 frames with KSampler, and prints what was
recorded: cross-attention maps of the tracked text positions and the self-attention sink statistics per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_comfy as tc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the tiny checkpoint (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    if tc.COMFYUI is None:
        print(tc.NOT_FOUND, file=sys.stderr)
        return 2
    pack = tc.load_comfy()
    wc = pack.wan_capture
    from importlib import import_module
    attach = import_module(pack.__name__ + ".nodes.comfy_attach").attach_recorder
    out = args.out or tempfile.mkdtemp(prefix="wan_capture_demo_")
    os.makedirs(out, exist_ok=True)
    ckpt = tc.tiny_wan_checkpoint(os.path.join(out, "tiny_wan21_t2v.safetensors"))
    model = tc.load_model(ckpt)
    plan = wc.RecordingPlan(text_positions=tuple(range(8)), record_sink_stats=True, storage_dtype="float32")
    rec = wc.Recorder(plan)
    recorded = attach(model, rec)
    latent = tc.ksampler(recorded, tc.conditioning("t2v", 1), tc.conditioning("t2v", 2), tc.empty_latent("t2v"),
                         steps=args.steps)
    take = rec.find(wc.fingerprint(latent["samples"]))
    s = take.summary()
    print(f"checkpoint: {ckpt}")
    print(f"recorded take {s['take']} ({s['status']}): grid {s['grid']} (frames x height x width), "
          f"{s['total_steps']} steps, blocks {s['blocks']}, heads {s['heads']}, text positions {s['text_positions']}")
    for step in take.steps:
        maps = take.cross[(step, "cond")]  # [batch, blocks, heads, tokens, T]
        sink = take.sink[(step, "cond")]
        received = sink["received"][0].mean(dim=(0, 1))  # mean over blocks and heads, per key
        top = received.topk(3)
        print(f"step {step} sigma {take.step_sigmas[step]:.3f}: cross maps {list(maps.shape)}, "
              f"mass on tracked tokens {float(maps.sum(-1).mean()):.4f}; top sink keys "
              f"{top.indices.tolist()} receive {[round(v, 4) for v in top.values.tolist()]} "
              f"(uniform would be {1 / received.numel():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
