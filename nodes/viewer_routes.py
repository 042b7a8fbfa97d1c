"""Server routes of the interactive viewer, on ComfyUI's PromptServer. Everything is read from ComfyUI's output
folder only; other paths get 403, missing files 404, and nothing about the request's path is logged."""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import json
import os

import folder_paths
from aiohttp import web

from ..wan_capture.recording.reader import ArrayTooLarge, DamagedFileError
from ..wan_capture.recording.confine import OutsideRoot, confined
from ..wan_capture.views.select import SelectionError
from ..wan_capture.views.slices import (frame_mass_slice, point_probe, reader, sink_slice,
                                  token_slice)

PREFIX = "/wan_capture"
KINDS = ("token", "sink", "frame_mass")


def _params(q) -> tuple:
    """The slice parameters, validated: a bad value is a 400, never a silent default."""
    kind, branch = q.get("kind", "token"), q.get("branch", "cond")
    block, head = q.get("block", "mean"), q.get("head", "mean")
    step = q.get("step", "0")
    if (kind not in KINDS or branch not in ("cond", "uncond") or not step.isdigit()
            or any(not (v == "mean" or v.isdigit()) for v in (block, head)) or len(step) > 6):
        raise ValueError("bad parameter")
    return kind, branch, int(step), block, head


def _guard(handler):
    async def wrapped(request):
        # short messages only: no path of the request or of a file reaches the reply or the log
        try:
            return await handler(request)
        except (OutsideRoot, FileNotFoundError, KeyError, IndexError):  # outside and missing alike: nothing is told
            return web.json_response({"error": "not found"}, status=404)
        except SelectionError as e:  # what the recording holds, said as the view nodes say it
            return web.json_response({"error": str(e)}, status=400)
        except ArrayTooLarge:
            return web.json_response({"error": "array too large"}, status=413)
        except DamagedFileError as e:
            return web.json_response({"error": f"damaged file: {e.file}"}, status=422)
        except ValueError:
            return web.json_response({"error": "bad request"}, status=400)
        except (TypeError, AttributeError, RecursionError, OverflowError):  # files of unexpected shape
            return web.json_response({"error": "damaged file"}, status=422)
    return wrapped


def _root() -> str:
    return folder_paths.get_output_directory()


HEAVY_AT_ONCE = 2  # requests that read and reduce arrays (and hold their reply) at once; more wait their turn
SEND_SECONDS = 20.0  # a heavy reply a client does not take in this long is dropped (its slot and bytes freed)
_heavy = asyncio.Semaphore(HEAVY_AT_ONCE)
# the heavy work's own threads: as many as may run at once, so the memory their allocator keeps is bounded too
_workers = concurrent.futures.ThreadPoolExecutor(max_workers=HEAVY_AT_ONCE, thread_name_prefix="wan_capture_viewer")


def _trimmed(fn):
    """``fn``, then the freed memory of its arrays handed back to the system (glibc keeps it otherwise)."""
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            _malloc_trim()
    return run


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _off_loop(fn, *args, **kwargs):
    """Reading and reducing arrays runs in a worker thread, a bounded number at a time: the server keeps answering
    ordinary requests meanwhile, and many heavy ones cannot add up their memory."""
    async with _heavy:
        return await asyncio.get_running_loop().run_in_executor(_workers, functools.partial(_trimmed(fn), *args,
                                                                                            **kwargs))


async def _heavy_reply(request, build) -> web.StreamResponse:
    """A heavy reply: ``build`` (in a worker) gives ``(body bytes, headers)``; the slot is held until the body has
    left (or the client, not reading, is dropped after SEND_SECONDS), so what waits in memory for slow clients is
    bounded by HEAVY_AT_ONCE replies, whatever the number of clients."""
    async with _heavy:
        body, headers = await asyncio.get_running_loop().run_in_executor(_workers, _trimmed(build))
        response = web.StreamResponse(headers=headers)
        response.content_type = "application/octet-stream"
        response.content_length = len(body)
        await response.prepare(request)
        try:
            await asyncio.wait_for(response.write(body), SEND_SECONDS)
            await response.write_eof()
        except (asyncio.TimeoutError, ConnectionError):
            if request.transport is not None:
                request.transport.abort()  # its buffered bytes go now
        return response


def _maps_dir(request) -> str:
    return confined(folder_paths.get_output_directory(), request.query.get("path", ""), must_exist=True)


def _video(request, maps_dir: str) -> str:
    video = request.query.get("video", "")
    if not video:
        raise ValueError("missing parameter: video")
    confined(maps_dir, video, must_exist=True)
    return video


def register(routes) -> None:
    @routes.get(PREFIX + "/videos")
    @_guard
    async def videos(request):
        maps_dir = _maps_dir(request)
        return web.json_response({"videos": reader(maps_dir, _root()).list_videos()})

    @routes.get(PREFIX + "/summary")
    @_guard
    async def summary(request):
        maps_dir = _maps_dir(request)
        video = _video(request, maps_dir)
        def build():  # parsed and serialised in the worker: a large summary never holds up the event loop
            s = reader(maps_dir, _root()).summary(video)
            s["frames_saved"] = sorted(n for n in _list(maps_dir, video, "frames") if n.endswith(".png"))
            return json.dumps(s).encode()
        body = await _off_loop(build)
        return web.Response(body=body, content_type="application/json")

    @routes.get(PREFIX + "/slice")
    @_guard
    async def slice_(request):
        maps_dir = _maps_dir(request)
        video = _video(request, maps_dir)
        q = request.query
        kind, branch, step, block, head = _params(q)

        def build():
            sinks = ""
            if kind == "sink":
                data, _ = sink_slice(maps_dir, video, step, branch, block, head, root=_root())
            elif kind == "frame_mass":  # one [query frame, key frame] picture; causal: sink frames marked
                data, meta = frame_mass_slice(maps_dir, video, step, branch, block, head, root=_root())
                data = data[None]
                sinks = ",".join(str(f) for f in meta["sink_frames"])
            else:
                data, _ = token_slice(maps_dir, video, q["token"], step, branch, block, head, root=_root())
            headers = {"X-Shape": ",".join(map(str, data.shape)), "X-Sinks": sinks,
                       "Access-Control-Expose-Headers": "X-Shape, X-Sinks", "Cache-Control": "no-store"}
            return data.astype("<f4").tobytes(), headers  # built in the worker, never on the event loop
        return await _heavy_reply(request, build)

    @routes.get(PREFIX + "/probe")
    @_guard
    async def probe(request):
        maps_dir = _maps_dir(request)
        video = _video(request, maps_dir)
        q = request.query
        values = [q.get(k, "") for k in ("frame", "y", "x")]
        branch = q.get("branch", "cond")
        if branch not in ("cond", "uncond") or not all(v.isdigit() and len(v) <= 6 for v in values):
            raise ValueError("bad parameter")
        frame, y, x = map(int, values)
        result = await _off_loop(point_probe, maps_dir, video, frame, y, x, branch, root=_root())
        return web.json_response(result, headers={"Cache-Control": "no-store"})

    @routes.get(PREFIX + "/frame")
    @_guard
    async def frame(request):
        maps_dir = _maps_dir(request)
        video = _video(request, maps_dir)
        index = int(request.query.get("index", "0"))
        path = confined(maps_dir, f"{video}/frames/frame_{index:04d}.png", must_exist=True)
        return web.FileResponse(path)


def _list(maps_dir: str, video: str, sub: str):
    try:
        return os.listdir(confined(maps_dir, f"{video}/{sub}", must_exist=True))
    except (FileNotFoundError, OutsideRoot):
        return []
