"""``python -m wan_capture``: headless batch runs against running ComfyUI servers, and template expansion.

    python -m wan_capture run --workflow example_workflows/wan21_t2v_attention.api.json \\
        --template "a beautiful [(flower:2.5) near a tree|(tree:3) next to a flower]" --seeds 1,2 \\
        --server http://127.0.0.1:8188 [--server http://127.0.0.1:8189] --batch-name study
    python -m wan_capture batch --workflow ... --template ... --ray [ADDRESS] --output-dir /shared/output
    python -m wan_capture expand "a [red|blue] car"
    python -m wan_capture causal-demo [--self-forcing ~/Self-Forcing] [--out out/causal_demo]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from .batch.runner import plan_jobs, run_batch
from .prompts.templates import TemplateError, expand_template


def _templates(args) -> list:
    out = list(args.template or [])
    if args.templates:
        with open(args.templates, encoding="utf-8") as f:
            out += [line.rstrip("\n") for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise SystemExit("give --template TEXT or --templates FILE (one template a line)")
    return out


def find_comfyui() -> str:
    """The ComfyUI to start: COMFYUI_PATH, the one this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``), or
    ~/ComfyUI."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for path in (os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(here)),
                 os.path.expanduser("~/ComfyUI")):
        if path and (os.path.isfile(os.path.join(path, "main.py")) or
                     os.path.isdir(os.path.join(path, "comfy_compatibility"))):
            return os.path.abspath(path)
    raise ValueError("no ComfyUI found for the Ray actors: give --comfyui or set COMFYUI_PATH")


async def _run_ray(args, workflow: dict, jobs: list):
    from .batch.local_server import ServerConfig
    from .batch.ray_runner import RayBatchConfig, run_batch_ray
    if not args.output_dir:
        raise ValueError("--ray needs --output-dir: the folder the recordings go to (shared by the nodes, or where "
                         "--copy-back sends them)")
    server = ServerConfig(comfyui=os.path.abspath(args.comfyui) if args.comfyui else find_comfyui(),
                          base_directory=args.base_directory, args=list(args.comfy_arg))
    config = RayBatchConfig(address=args.ray or None, server=server, actors=args.ray_actors,
                            copy_back=args.copy_back)
    return await run_batch_ray(workflow, jobs, args.batch_name, args.state_dir, config, args.output_dir,
                               timeout=args.timeout, retries=args.retries)


def _sink_report(args) -> int:
    from .recording.analyzer import AttentionAnalyzer
    from .views.sink_report import compare_rows, sink_table, write_sink_report
    found = []
    for run in args.runs:
        an = AttentionAnalyzer(run)
        videos = [args.video] if args.video else an.list_videos()
        if not videos:
            raise ValueError(f"no saved videos in {run!r}")
        found += [(an, run, video) for video in videos]
    labels = _run_labels([(os.path.abspath(run), video) for _, run, video in found])
    steps = [int(x) for x in args.steps.split(",")] if args.steps else None
    tables = [sink_table(an.recording(video), args.multiple, args.threshold, label=label, steps=steps)
              for (an, _, video), label in zip(found, labels)]
    files = write_sink_report(tables, args.out, args.step, args.branch, figures=not args.tables_only)
    for t in tables:
        step = t.denoise_step(args.branch) if args.step is None else args.step
        print(f"sink report of {t.label} ({t.design or 'bidirectional'}): {len(t.rows)} rows (step x branch x chunk "
              f"x block x head), figures at step {step}")
        for c in t.chunks(step, args.branch):
            at = t.select(step, args.branch, chunk=c)
            print(f"  chunk {c}: " + ", ".join(f"{name} {_fmt_mean(at, name)}" for name in (
                "mass_sink", "uniform_sink", "sink_ratio", "head_consensus", "mean_concentration")))
    if len(tables) > 1:
        print(f"compared: {len(compare_rows(tables, args.branch))} (run, chunk) rows in compare.csv")
    for name, path in files.items():
        print(f"  {name}: {path}")
    return 0


def _run_labels(runs) -> list:
    """``(attention_maps folder, video)`` -> names that tell the runs apart: the folders above ``attention_maps``
    (as few as needed, from the batch folder up) and the video."""
    for depth in range(1, 64):
        labels = ["/".join(os.path.dirname(folder).split(os.sep)[-depth:] + [video]) for folder, video in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{folder}/{video}" for folder, video in runs]


def _fmt_mean(rows, name: str) -> str:
    from .views.sink_table import column_mean
    value = column_mean(rows, name)
    return "-" if value is None else f"{value:.4f}"


def _batch_args(run) -> None:
    run.add_argument("--workflow", required=True, help="API-format workflow JSON (an example_workflows/*.api.json)")
    run.add_argument("--template", action="append", help="a prompt template; repeatable")
    run.add_argument("--templates", help="a file of templates, one a line ('#' comments)")
    run.add_argument("--seeds", default="1", help="comma-separated seeds, e.g. 1,2,3")
    run.add_argument("--server", action="append", help="ComfyUI URL; repeat for several servers (one per GPU)")
    run.add_argument("--batch-name", default="wan_attention")
    run.add_argument("--state-dir", default=".", help="where the batch manifest is kept (for resuming)")
    run.add_argument("--download", help="also copy every saved file here, from the servers' /view")
    run.add_argument("--output-dir", help="the servers' output folder, when local: finished videos found there are skipped")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds one video may take (default 3600)")
    run.add_argument("--retries", type=int, default=3,
                     help="failed connections in a row after which a server leaves the batch (default 3)")
    ray = run.add_argument_group("Ray (pip install .[ray])")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run on a Ray cluster: one actor per GPU, each starting its own ComfyUI (ADDRESS: the "
                          "cluster's, e.g. auto or ray://head:10001; none: a local one)")
    ray.add_argument("--comfyui", help="the ComfyUI each actor starts, the same path on every node (default: "
                                       "COMFYUI_PATH, the ComfyUI this pack is installed in, or ~/ComfyUI)")
    ray.add_argument("--base-directory", help="ComfyUI's --base-directory for the actors' servers")
    ray.add_argument("--comfy-arg", action="append", default=[], help="an argument for the actors' servers "
                                                                     "(e.g. --comfy-arg=--cpu); repeatable")
    ray.add_argument("--ray-actors", type=int, help="how many actors (default: one per GPU, else one per node)")
    ray.add_argument("--copy-back", action="store_true",
                     help="each node writes locally and sends each finished video to --output-dir (default: "
                          "--output-dir is a shared folder every node writes to)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["causal-demo"]:
        from devtools.causal_demo import main as causal_demo
        return causal_demo(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m wan_capture", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("run", "batch"):
        _batch_args(sub.add_parser(name, help="queue templates x seeds on ComfyUI servers or a Ray cluster, "
                                               "resumable" + (" (the same as batch)" if name == "run" else "")))
    sub.add_parser("causal-demo", help="record a tiny causal Wan with a KV cache, save and draw it (see --help)")
    exp = sub.add_parser("expand", help="print the variations of a template with their prompt ids")
    exp.add_argument("template")
    rep = sub.add_parser("sink-report", help="the sink metrics of saved recordings as tables and figures, several "
                                             "runs side by side")
    rep.add_argument("runs", nargs="+", metavar="RUN",
                     help="a saved <batch_name>/attention_maps folder (each of its videos is a run); several compare")
    rep.add_argument("--out", required=True, help="where the report's files go")
    rep.add_argument("--video", help="only this video id of each folder")
    rep.add_argument("--step", type=int, help="the step the figures show (default: each run's last denoising step)")
    rep.add_argument("--steps", help="only these steps in the tables, comma-separated (default: every step)")
    rep.add_argument("--multiple", type=float, default=2.0,
                     help="a behavioural sink takes more than this many times its uniform share (default 2)")
    rep.add_argument("--threshold", type=float, default=0.9,
                     help="head pairs counted as agreeing at 1 - JS of at least this (default 0.9)")
    rep.add_argument("--branch", default="cond", choices=["cond", "uncond"])
    rep.add_argument("--tables-only", action="store_true",
                     help="write the tables only (figures need matplotlib: "
                          "pip install 'wan-attention-capture[report]')")
    args = ap.parse_args(argv)
    try:
        if args.command == "sink-report":
            return _sink_report(args)
        if args.command == "expand":
            for v in expand_template(args.template):
                print(f"{v.prompt_id}\t{v.prompt}")
            return 0
        with open(args.workflow, encoding="utf-8") as f:
            workflow = json.load(f)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        jobs = plan_jobs(_templates(args), seeds)
        if args.ray is not None:
            manifest = asyncio.run(_run_ray(args, workflow, jobs))
        else:
            manifest = asyncio.run(run_batch(workflow, jobs, args.server or ["http://127.0.0.1:8188"],
                                             args.batch_name, args.state_dir, args.download, args.output_dir,
                                             timeout=args.timeout, retries=args.retries))
    except (TemplateError, ValueError, OSError, ImportError) as e:  # ImportError: the report's extra is missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .batch.runner import job_key
    return 0 if all(manifest.done(j.video_id, job_key(j, workflow)) for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
