"""Headless batch runs: prompt templates x seeds through an API-format workflow on one or more ComfyUI servers.

Each (variation, seed) is one video ``<prompt_id>_vid<NNN>`` (prompt ids count across every template's variations
in order; NNN is the seed's position, from 001). The runner writes each job into the workflow's Weighted Token
Tracker, sampler seeds and Save Attention Maps node, spreads the queue over the servers (one job at a time per
server), records every finished or failed video in a manifest next to the batch, and on a restart skips what is
done. A failed video is reported and the batch goes on.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ..recording.confine import confined
from ..recording.save import atomic_write, safe_name
from ..prompts.templates import expand_template

SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "RandomNoise": "noise_seed"}
TRACKER, SAVE, ATTACH = "WanWeightedTokenTracker", "WanSaveAttention", "WanAttachRecorder"


@dataclass(frozen=True)
class Job:
    prompt_id: str
    prompt: str
    seed: int
    video_number: int

    @property
    def video_id(self) -> str:
        return f"{self.prompt_id}_vid{self.video_number:03d}"


def plan_jobs(templates: Sequence[str], seeds: Sequence[int]) -> List[Job]:
    """Every variation of every template, times every seed, in a stable order."""
    prompts = [v.prompt for t in templates for v in expand_template(t)]
    return [Job(f"prompt_{i:03d}", p, int(seed), n + 1) for i, p in enumerate(prompts) for n, seed in enumerate(seeds)]


def prepare(workflow: dict, job: Job, batch_name: str) -> dict:
    """A copy of the API-format ``workflow`` set up for ``job``."""
    graph = copy.deepcopy(workflow)
    saves = [n for n in graph.values() if n.get("class_type") == SAVE]
    if not saves:
        raise ValueError(f"the workflow has no 'Save Attention Maps' node ({SAVE}): nothing would be kept")
    # a tracker of the negative prompt keeps its text: the job's prompt is the positive one
    negative = {str(n["inputs"]["negative_tracking"][0]) for n in graph.values() if n.get("class_type") == ATTACH
                and isinstance(n.get("inputs", {}).get("negative_tracking"), list)}
    for nid, node in graph.items():
        cls, inputs = node.get("class_type"), node.setdefault("inputs", {})
        if cls == TRACKER and str(nid) not in negative:
            inputs.update(text=job.prompt, variation=0)
        elif cls == SAVE:  # the manifest names each video: a re-run replaces its folder rather than adding _2
            inputs.update(batch_name=batch_name, prompt_id=job.prompt_id, video_number=job.video_number, overwrite=True)
        if cls in SEED_INPUTS and not isinstance(inputs.get(SEED_INPUTS[cls]), list):
            inputs[SEED_INPUTS[cls]] = job.seed
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str):
            inputs["filename_prefix"] = f"{safe_name(batch_name)}/{job.video_id}/{os.path.basename(prefix)}"
    return graph


def job_key(job: Job, workflow: dict) -> str:
    """What makes a video the same job: its prompt, seed, numbering and the workflow it runs through."""
    text = json.dumps({"job": asdict(job), "workflow": workflow}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


class Manifest:
    """``<state_dir>/<batch_name>.manifest.json``: what each video came to, rewritten atomically after each one.

    An entry is keyed by its video id and carries the :func:`job_key` of the job that made it: a restarted batch
    whose job for that video changed (another template, seed or workflow) runs it again."""

    def __init__(self, state_dir: str, batch_name: str):
        os.makedirs(state_dir, exist_ok=True)
        self.path = confined(state_dir, f"{safe_name(batch_name)}.manifest.json", purpose="write")
        self.videos: Dict[str, dict] = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.videos = json.load(f).get("videos", {})

    def done(self, video_id: str, key: Optional[str] = None) -> bool:
        entry = self.videos.get(video_id, {})
        return entry.get("status") == "done" and (key is None or entry.get("key") == key)

    def record(self, video_id: str, **entry) -> None:
        self.videos[video_id] = entry
        atomic_write(self.path, (json.dumps({"videos": self.videos}, indent=2) + "\n").encode())


def saved_files(history: dict) -> List[dict]:
    """The Save Attention Maps reports in a ``/history`` entry (a malformed one is a ComfyError saying what)."""
    from .client import ComfyError
    out = []
    for node_out in (history.get("outputs") or {}).values():
        reports = node_out.get("attention_maps", []) if isinstance(node_out, dict) else None
        if not isinstance(reports, list) or not all(
                isinstance(r, dict) and isinstance(r.get("files", []), list)
                and all(isinstance(f, str) for f in r.get("files", [])) for r in reports):
            raise ComfyError(f"the server's /history has a malformed Save Attention Maps report: {str(node_out)[:300]}")
        out.extend(reports)
    return out


def locally_complete(output_dir: Optional[str], batch_name: str, job: Job) -> bool:
    """A complete recording of exactly this job (same prompt and seed) is already in the servers' output folder."""
    if not output_dir:
        return False
    path = os.path.join(output_dir, safe_name(batch_name), "attention_maps", job.video_id, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    written = summary.get("prompt_weighted", summary.get("prompt"))  # the prompt as the job wrote it
    return summary.get("status") == "complete" and summary.get("seed") == job.seed and written in (job.prompt, None)


def pending(jobs: Sequence[Job], workflow: dict, manifest: Manifest, batch_name: str,
            output_dir: Optional[str] = None) -> List[Job]:
    """The jobs still to run: not done under the same job key, nor found complete for the same job on disk."""
    todo = []
    for j in jobs:
        key = job_key(j, workflow)
        if manifest.done(j.video_id, key):
            continue
        if locally_complete(output_dir, batch_name, j):  # finished on the server after a runner was killed
            manifest.record(j.video_id, status="done", server=None, found_in=output_dir, job=asdict(j), key=key)
            continue
        todo.append(j)
    return todo


async def run_batch(workflow: dict, jobs: Sequence[Job], servers: Sequence[str], batch_name: str, state_dir: str,
                    download: Optional[str] = None, output_dir: Optional[str] = None, log=print,
                    timeout: float = 3600.0, retries: int = 3, backoff: float = 1.0,
                    max_download: Optional[int] = None) -> Manifest:
    """Run every job not yet done; returns the manifest (each video: done with its files, or failed with why).

    A server that cannot be reached gives its job back to the queue and retries with back-off (``backoff`` seconds,
    doubling); after ``retries`` failures in a row it leaves the batch to the others. A prompt the server refuses or
    fails, or a malformed reply, fails that video only. ``timeout``: seconds one video may take (every wait for a
    server is bounded by it); ``max_download``: bytes one downloaded file may have.
    """
    from .client import ComfyClient
    clients = {url: ComfyClient(url, timeout=timeout, **({"max_download": max_download} if max_download else {}))
               for url in servers}
    return await run_on(workflow, jobs, clients, batch_name, state_dir, download, output_dir, log, timeout, retries,
                        backoff, max_download)


async def run_on(workflow: dict, jobs: Sequence[Job], clients: Dict[str, object], batch_name: str, state_dir: str,
                 download: Optional[str] = None, output_dir: Optional[str] = None, log=print, timeout: float = 3600.0,
                 retries: int = 3, backoff: float = 1.0, max_download: Optional[int] = None) -> Manifest:
    """:func:`run_batch` over ``clients`` (a name -> a client with ``run`` and ``download`` as
    :class:`~wan_capture.batch.client.ComfyClient`'s: an HTTP server, or a Ray actor that owns one)."""
    import aiohttp
    manifest = Manifest(state_dir, batch_name)
    todo = pending(jobs, workflow, manifest, batch_name, output_dir)
    log(f"batch {batch_name}: {len(jobs)} videos, {len(jobs) - len(todo)} already done, {len(todo)} to run on "
        f"{len(clients)} server(s)")
    bar = _progress_bar(len(jobs), len(jobs) - len(todo)) if log is print else None
    if bar is not None:  # a terminal: the total as a bar, each video's line above it
        def log(text, _bar=bar):
            _bar.write(text)
            _bar.n = batch.finished
            _bar.refresh()
    batch = _Batch(workflow, len(jobs), todo, list(clients), batch_name, manifest, download, log, timeout, retries,
                   backoff, max_download)
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(batch.worker(name, client, session) for name, client in clients.items()))
    finally:
        if bar is not None:
            bar.close()
    failed = [v for v, e in manifest.videos.items() if e.get("status") != "done"]
    log(f"batch {batch_name}: {len(jobs) - len(failed)} done, {len(failed)} failed" +
        (f" ({', '.join(failed)})" if failed else ""))
    return manifest


def _progress_bar(total: int, done: int):
    """A tqdm bar of the batch's videos where the output is a terminal and tqdm is installed, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="video", file=sys.stderr)


def progress_label(class_type: Optional[str]) -> str:
    """What a node's progress bar counts, for the runner's progress line."""
    if class_type == "WanSaveAttention":
        return "Save Attention Maps: files written"
    if class_type and ("Sampler" in class_type or class_type.startswith("KSampler")):
        return f"{class_type}: sampling steps"
    return f"{class_type or 'node'}: progress"


class _Batch:
    """The shared queue of a batch and its servers' workers (see :func:`run_batch`)."""

    def __init__(self, workflow, total, todo, servers, batch_name, manifest, download, log, timeout, retries,
                 backoff, max_download=None):
        self.workflow, self.total, self.servers, self.batch_name = workflow, total, list(servers), batch_name
        self.manifest, self.download, self.log = manifest, download, log
        self.timeout, self.retries, self.backoff, self.max_download = timeout, retries, backoff, max_download
        self.queue: asyncio.Queue = asyncio.Queue()
        for j in todo:
            self.queue.put_nowait(j)
        self.finished = total - len(todo)
        self.alive = {url: True for url in servers}
        self.busy = 0  # jobs in flight: an idle worker waits for them, since a failing server may hand one back

    def _record(self, job: Job, **entry) -> None:
        self.manifest.record(job.video_id, job=asdict(job), key=job_key(job, self.workflow), **entry)

    async def attempt(self, url: str, client, session, job: Job) -> None:
        """Run one job; raises Unreachable when the server could not be reached (the job goes back to the queue)."""
        import aiohttp
        from .client import ComfyError, Unreachable
        t0 = time.monotonic()

        def progress(p):
            if p.max:
                what = progress_label(self.workflow.get(str(p.node), {}).get("class_type"))
                print(f"\r  {job.video_id} on {url}: {what} {p.value}/{p.max}", end="", file=sys.stderr, flush=True)
        try:
            entry = await client.run(session, prepare(self.workflow, job, self.batch_name), progress)
            reports = saved_files(entry)
            files = [f for r in reports for f in r.get("files", [])]
            for rel in files if self.download else []:
                data = await client.download(session, os.path.dirname(rel), os.path.basename(rel))
                dest = confined(self.download, rel, purpose="write")
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                atomic_write(dest, data)
            status = "done" if reports and all(r.get("status") == "complete" for r in reports) else "failed"
            self._record(job, status=status, server=url, seconds=round(time.monotonic() - t0, 2), files=files,
                         **({} if status == "done" else {"error": "the save node reported partial data"}))
        except Unreachable:
            if any(self.alive[u] for u in self.servers if u != url) or self.alive[url]:
                raise
            self._record(job, status="failed", server=url, error="no server could be reached")
        except (ComfyError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError,
                TypeError) as e:  # this video failed; the batch goes on
            self._record(job, status="failed", server=url, error=f"{type(e).__name__}: {e}")
        self.finished += 1
        done = self.manifest.videos[job.video_id]
        print("", file=sys.stderr)
        self.log(f"[{self.finished}/{self.total}] {job.video_id} {done['status']} on {url}"
                 + (f": {done['error']}" if done["status"] != "done" else f" ({done['seconds']} s)"))

    async def worker(self, url: str, client, session) -> None:
        from .client import Unreachable
        misses = 0
        while True:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if self.busy == 0:
                    return
                await asyncio.sleep(0.05)
                continue
            self.busy += 1
            try:
                await self.attempt(url, client, session, job)
                misses = 0
            except Unreachable as e:
                misses += 1
                self.queue.put_nowait(job)  # another server (or this one, after a pause) takes it
                if misses >= self.retries:
                    self.alive[url] = False
                    self.log(f"server {url} left the batch after {misses} failed attempts: {e}")
                    if any(self.alive.values()):
                        return
                else:
                    await asyncio.sleep(self.backoff * 2 ** (misses - 1))
            finally:
                self.busy -= 1
