"""The batch runner on a Ray cluster: one actor per GPU (or per node, on CPU-only clusters), each starting and
owning a ComfyUI server on its node, the jobs, manifest and resume of :mod:`wan_capture.batch.runner`.

A batch started with ``--server`` URLs and one started with ``--ray`` run the same prepared prompts and write the same
folders and the same manifest, so either can resume the other. Ray places the actors and restarts a lost one (whose
``__init__`` starts a new server); a video whose actor was lost goes back to the queue and runs again elsewhere (its
half-written folder is marked partial by the save, and replaced whole by the rerun, since the runner saves with
``overwrite``). Ray is imported only here: ``pip install .[ray]``; the ComfyUI nodes never need it.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..recording.confine import confined, safe_name
from .client import ComfyError, Unreachable
from .local_server import ServerConfig
from .runner import Job, Manifest, SAVE, run_on, saved_files

MAX_COPY_BYTES = 8 << 30  # what one video's files may add up to when copied back to the driver


@dataclass
class RayBatchConfig:
    """Where and how the batch runs on Ray.

    Args:
        address: the cluster to join (``ray.init(address=...)``: ``auto``, ``ray://host:10001``, ``host:6379``);
            None starts a local one for this batch.
        server: the ComfyUI each actor starts on its node (the same path on every node; the pack installed in it).
        actors: how many actors (default: one per GPU of the cluster, else one per node).
        gpus_per_actor: GPUs each actor holds (1 where the cluster has GPUs; 0 on CPU-only clusters).
        cpus_per_actor: CPUs each actor holds (Ray's accounting; ComfyUI uses the threads it finds).
        copy_back: each node writes into its own ``node_output`` (default: a temporary folder there) and the actor
            sends each finished video's files to the driver's output folder (sizes bounded, checksums checked);
            False (default): the server's output folder is ``server.output_directory``, a path every node sees.
        node_output: the node-local output folder when copying back.
        max_restarts: how often Ray restarts a lost actor (each restart starts a new server).
    """

    address: Optional[str] = None
    server: ServerConfig = field(default_factory=lambda: ServerConfig(comfyui=""))
    actors: Optional[int] = None
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: float = 1.0
    copy_back: bool = False
    node_output: Optional[str] = None
    max_restarts: int = 3


class ComfyWorker:
    """A Ray actor owning one ComfyUI server on its node; ``run`` sends it one prepared prompt."""

    def __init__(self, name: str, server: ServerConfig, copy_back: bool, timeout: float):
        import dataclasses
        from .local_server import LocalServer
        self.name, self.copy_back, self.timeout, self.current = name, copy_back, timeout, None
        if copy_back and not server.output_directory:
            server = dataclasses.replace(server, output_directory=tempfile.mkdtemp(prefix=f"wan_capture_{name}_"))
        log = os.path.join(tempfile.gettempdir(), f"wan_capture_{safe_name(name)}_{os.getpid()}.log")
        self.server = LocalServer(server, log)
        self.server.start()

    def __repr__(self) -> str:  # Ray's dashboard names an actor by this: the video it is on
        return f"ComfyWorker({self.name}: {self.current or 'idle'})"

    def status(self) -> dict:
        return {"name": self.name, "current": self.current, "pid": os.getpid(),
                "server_pid": self.server.proc.pid if self.server.proc else None, "url": self.server.url}

    async def run(self, prompt: dict, video_id: str) -> dict:
        """The prompt's ``/history`` entry, and with ``copy_back`` the files its Save reported (path, bytes, sha256)."""
        import aiohttp
        from .client import ComfyClient
        self.current = video_id
        try:
            if not self.server.alive():  # the server died since the last video: a new one
                self.server.start()
            client = ComfyClient(self.server.url, timeout=self.timeout)
            async with aiohttp.ClientSession() as session:
                try:
                    entry = await client.run(session, prompt)
                except Unreachable:
                    if not self.server.alive():
                        self.server.start()  # for the next video; this one goes back to the queue
                    raise
            files = self._files(entry) if self.copy_back else []
            return {"entry": entry, "files": files}
        finally:
            self.current = None

    def _files(self, entry: dict) -> List[tuple]:
        root = self.server.config.output_directory
        out, total = [], 0
        for rel in [f for r in saved_files(entry) for f in r.get("files", []) or []]:
            path = confined(root, rel)
            size = os.path.getsize(path)
            total += size
            if total > MAX_COPY_BYTES:
                raise ComfyError(f"the video's files add up to more than {MAX_COPY_BYTES} bytes: not copied back")
            with open(path, "rb") as f:
                data = f.read()
            out.append((rel, data, hashlib.sha256(data).hexdigest()))
        return out

    def stop(self) -> None:
        self.server.stop()


class RayClient:
    """The driver's side of one actor, with :class:`~wan_capture.batch.client.ComfyClient`'s ``run``: a lost actor is
    ``Unreachable`` (the video goes back to the queue), files sent back are checked and written as a unit."""

    def __init__(self, actor, output_dir: Optional[str], copy_back: bool):
        self.actor, self.output_dir, self.copy_back = actor, output_dir, copy_back

    async def run(self, session, prompt: dict, on_progress=None) -> dict:
        import ray
        save = next(n["inputs"] for n in prompt.values() if n.get("class_type") == SAVE)
        video = f"{save.get('prompt_id', 'prompt_000')}_vid{int(save.get('video_number', 1)):03d}"
        try:
            result = await self.actor.run.remote(prompt, video)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise cause if isinstance(cause, ComfyError) else ComfyError(str(e)[:2000]) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise Unreachable(f"the actor was lost: {type(e).__name__}") from None
        if self.copy_back:
            write_back(self.output_dir, result["files"])
        return result["entry"]

    async def download(self, session, subfolder: str, filename: str, kind: str = "output") -> bytes:
        raise ComfyError("--download is for --server runs; with --ray the recordings are in the output folder")


def write_back(output_dir: Optional[str], files: Sequence[tuple]) -> None:
    """Write a video's files, sent back by its actor, into ``output_dir``: each checked against its checksum, the
    video's folder put in place whole (a folder being replaced is swapped, never mixed)."""
    import secrets
    from ..recording.save import _name_lock, _swap_in
    if not output_dir:
        raise ComfyError("copying back needs the driver's output folder (--output-dir)")
    folders: Dict[str, List[tuple]] = {}
    for rel, data, digest in files:
        if hashlib.sha256(data).hexdigest() != digest:
            raise ComfyError(f"{rel} arrived damaged (checksum mismatch)")
        parts = rel.split("/")
        if len(parts) < 4 or parts[1] != "attention_maps":
            raise ComfyError(f"{rel} is not a file of a recording (<batch>/attention_maps/<video>/...)")
        folders.setdefault("/".join(parts[:3]), []).append(("/".join(parts[3:]), data))
    for folder, items in folders.items():
        final = confined(output_dir, folder, purpose="write")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
        try:
            for rel, data in sorted(items, key=lambda x: x[0] == "summary.json"):  # summary.json last
                path = confined(work, rel, purpose="write")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            with _name_lock(os.path.dirname(final), os.path.basename(final)):  # as a save of that name would
                _swap_in(work, final, secrets.token_hex(8))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def actor_count(ray, config: RayBatchConfig) -> int:
    if config.actors:
        return int(config.actors)
    gpus = int(ray.cluster_resources().get("GPU", 0) // max(config.gpus_per_actor or 1, 1e-9))
    return gpus or len([n for n in ray.nodes() if n.get("Alive")])


async def run_batch_ray(workflow: dict, jobs: Sequence[Job], batch_name: str, state_dir: str,
                        config: RayBatchConfig, output_dir: Optional[str] = None, log=print,
                        timeout: float = 3600.0, retries: int = 3, backoff: float = 1.0) -> Manifest:
    """:func:`~wan_capture.batch.runner.run_batch` with Ray actors in place of server URLs; every actor (and its
    server) is ended when the batch ends, and a cluster this call started is shut down."""
    import ray
    started = not ray.is_initialized()
    if started:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(address=config.address, runtime_env={"py_modules": [package]}, log_to_driver=False)
    server = config.server
    if not config.copy_back:
        server = ServerConfig(**{**server.__dict__, "output_directory": server.output_directory or output_dir})
    elif config.node_output:
        server = ServerConfig(**{**server.__dict__, "output_directory": config.node_output})
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    n = actor_count(ray, config)
    worker = ray.remote(ComfyWorker)
    names = [f"wan-capture-{safe_name(batch_name)}-{i}" for i in range(n)]
    actors = [worker.options(name=name, num_gpus=gpus, num_cpus=config.cpus_per_actor,
                             max_restarts=config.max_restarts, max_task_retries=0, scheduling_strategy="SPREAD")
              .remote(name, server, config.copy_back, timeout) for name in names]
    try:
        clients = {f"ray:{name}": RayClient(a, output_dir, config.copy_back) for name, a in zip(names, actors)}
        return await run_on(workflow, jobs, clients, batch_name, state_dir, None, output_dir, log, timeout, retries,
                            backoff)
    finally:
        for a in actors:
            try:
                await asyncio.wait_for(a.stop.remote(), 30)
            except Exception:  # noqa: BLE001  an actor already gone has no server left to stop
                pass
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
