"""First recording in one command: start ComfyUI headless with this pack, run the Wan 2.1 t2v example through the
API, and print where the heatmaps and arrays are.

    python -m scripts.demo                      # tiny random models built on the fly: runs anywhere, in seconds
    python -m scripts.demo --unet wan2.1_t2v_1.3B_fp16.safetensors --clip umt5_xxl_fp8_e4m3fn_scaled.safetensors \\
        --vae wan_2.1_vae.safetensors [--base-directory <folder with models/>] [--gpu]

ComfyUI is found at COMFYUI_PATH, two folders up (the pack in <ComfyUI>/custom_nodes/) or ~/ComfyUI. Without it the
same kind of recording runs through the Python API on a tiny official Wan model (devtools/python_demo.py), into
``--out`` (default out/demo_python).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from devtools import comfy_server
from devtools import tiny_comfy
from devtools.tiny_workflow import to_tiny

from wan_capture import AttentionAnalyzer
from wan_capture.batch.runner import plan_jobs, run_batch

WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", help="Wan 2.1 t2v diffusion model file in models/diffusion_models")
    ap.add_argument("--clip", help="umt5 text encoder file in models/text_encoders")
    ap.add_argument("--vae", help="Wan 2.1 VAE file in models/vae")
    ap.add_argument("--base-directory", help="ComfyUI base directory holding models/ (default: a temporary one)")
    ap.add_argument("--prompt", default="a beautiful (flower:2.5) near a (tree:1.5), gentle wind, sunny garden")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo_python"),
                    help="output folder of the demo without ComfyUI")
    args = ap.parse_args(argv)
    if tiny_comfy.COMFYUI is None:
        print("ComfyUI not found (COMFYUI_PATH, two folders up, ~/ComfyUI): running the demo through the Python API "
              "instead")
        from devtools.python_demo import main as python_demo
        return python_demo(args.out)
    real = all((args.unet, args.clip, args.vae))
    with open(WORKFLOW) as f:
        workflow = json.load(f)
    if real:
        for node in workflow.values():
            key = {"UNETLoader": "unet_name", "CLIPLoader": "clip_name", "VAELoader": "vae_name"}.get(node["class_type"])
            if key:
                node["inputs"][key] = {"unet_name": args.unet, "clip_name": args.clip, "vae_name": args.vae}[key]
    else:
        workflow = to_tiny(workflow)
    base = args.base_directory or tempfile.mkdtemp(prefix="wan_capture_demo_")
    print(f"starting ComfyUI ({tiny_comfy.COMFYUI}) with base directory {base} ...")
    proc, url, log = comfy_server.start(tiny_comfy.COMFYUI, base, tiny_nodes=not real)
    try:
        jobs = plan_jobs([args.prompt], [42])
        manifest = asyncio.run(run_batch(workflow, jobs, [url], "demo", base))
    finally:
        comfy_server.stop(proc)
    entry = manifest.videos[jobs[0].video_id]
    if entry["status"] != "done":
        print(f"the demo failed: {entry.get('error')} (server log: {log})", file=sys.stderr)
        return 1
    out = os.path.join(base, "output")
    maps = os.path.join(out, "demo", "attention_maps")
    an = AttentionAnalyzer(maps)
    video = jobs[0].video_id
    print(f"\nattention arrays and metadata: {os.path.join(maps, video)}")
    for token in an.list_tokens(video):
        evo = an.get_temporal_evolution(video, token)  # [steps, spatial, pieces]
        peak = an.get_spatial_attention_map(video, token, step=an.list_steps(video, token)[-1])[0]
        f, y, x = (int(i) for i in np.unravel_index(peak.argmax(), peak.shape))
        print(f"  token '{token}': {evo.shape[0]} steps, last-step attention peaks at frame {f}, pixel ({x}, {y})")
    heat = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(os.path.join(out, "demo"))
                  for n in names if n.endswith((".webp", ".png")))
    print("heatmaps:\n" + "\n".join(f"  {os.path.join(out, h)}" for h in heat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
