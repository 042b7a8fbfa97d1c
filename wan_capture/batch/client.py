"""A small client for a running ComfyUI server: queue an API-format prompt, follow it over the websocket, read
``/history``, download outputs with ``/view``. Needs aiohttp (ComfyUI's own dependency)."""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlencode


class ComfyError(RuntimeError):
    """The server refused or failed a prompt; the message carries the server's own words."""


class Unreachable(ComfyError):
    """The server could not be reached (or dropped the connection) before it took the prompt: the job can go to
    another server."""


@dataclass
class Progress:
    prompt_id: str
    node: Optional[str] = None
    value: int = 0
    max: int = 0
    events: list = field(default_factory=list)
    done: bool = False


MAX_DOWNLOAD = 1 << 30  # bytes one downloaded output may have (a real recording's largest file is ~0.25 GiB)
REPLY_SECONDS = 60.0  # a POST /prompt or /history reply: the server answers these at once or not at all


class ComfyClient:
    def __init__(self, url: str, timeout: float = 3600.0, max_download: int = MAX_DOWNLOAD):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.timeout, self.max_download = timeout, max_download

    def _bounded(self, seconds: float):
        import aiohttp
        return aiohttp.ClientTimeout(total=min(seconds, self.timeout))

    async def run(self, session, prompt: dict, on_progress: Optional[Callable[[Progress], None]] = None) -> dict:
        """Queue ``prompt``, wait for it over the websocket, return its ``/history`` entry (raises ComfyError)."""
        import aiohttp
        ws_url = self.url.replace("http", "ws", 1) + "/ws?" + urlencode({"clientId": self.client_id})
        try:
            ws = await session.ws_connect(ws_url, heartbeat=30)
        except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError, OSError, asyncio.TimeoutError) as e:
            raise Unreachable(f"{self.url} cannot be reached: {type(e).__name__}: {e}") from None
        async with ws:
            try:
                async with session.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id},
                                        timeout=self._bounded(REPLY_SECONDS)) as r:
                    text = (await r.read()).decode("utf-8", "replace")  # a reply of any bytes is read, never a crash
            except asyncio.TimeoutError:  # before ClientConnectionError: aiohttp's read timeout is both
                raise ComfyError(f"{self.url} did not answer POST /prompt within "
                                 f"{min(REPLY_SECONDS, self.timeout):g} s") from None
            except (aiohttp.ClientConnectionError, OSError) as e:
                raise Unreachable(f"{self.url} dropped the connection: {type(e).__name__}: {e}") from None
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if r.status != 200 or not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str) \
                    or not body["prompt_id"]:
                raise ComfyError(f"{self.url} refused the prompt or answered without a prompt id: HTTP {r.status}: "
                                 f"{text[:500] or '(empty reply)'}")
            pid = body["prompt_id"]
            progress = Progress(pid)
            # the websocket can close early (server restart, proxy): then /history says how the prompt ended
            await asyncio.wait_for(self._follow(ws, progress, on_progress), self.timeout)
        return await self.history(session, pid, wait=self.timeout if not progress.done else 30.0)

    async def _follow(self, ws, progress: Progress, on_progress) -> None:
        async for msg in ws:
            if msg.type.name != "TEXT":
                continue  # binary preview frames
            try:
                data = json.loads(msg.data)
            except ValueError:
                continue  # a malformed message is no news about the prompt
            if not isinstance(data, dict) or not isinstance(data.get("data", {}), dict):
                continue
            kind, d = data.get("type"), data.get("data", {})
            if d.get("prompt_id") not in (None, progress.prompt_id):
                continue
            if kind == "progress":
                progress.value, progress.max, progress.node = d.get("value", 0), d.get("max", 0), d.get("node")
                if on_progress:
                    on_progress(progress)
            elif kind == "execution_error":
                raise ComfyError(f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                                 f"{d.get('exception_type')}: {d.get('exception_message')}")
            elif kind == "execution_interrupted":
                raise ComfyError("the prompt was interrupted on the server")
            elif kind == "execution_success" or (kind == "executing" and d.get("node") is None
                                                  and d.get("prompt_id") == progress.prompt_id):
                progress.done = True
                return

    async def history(self, session, prompt_id: str, wait: float = 30.0) -> dict:
        # the websocket can announce the end a moment before the server files the history entry
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            async with session.get(f"{self.url}/history/{prompt_id}", timeout=self._bounded(REPLY_SECONDS)) as r:
                text = (await r.read()).decode("utf-8", "replace")  # a reply of any bytes is read, never a crash
            try:
                data = json.loads(text) if r.status == 200 else None
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise ComfyError(f"{self.url}/history answered HTTP {r.status}: {text[:300]}")
            if prompt_id in data or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        if prompt_id not in data:
            raise ComfyError(f"{self.url}/history has no entry for prompt {prompt_id}")
        entry = data[prompt_id]
        if not isinstance(entry, dict) or not isinstance(entry.get("status", {}), dict) \
                or not isinstance(entry.get("outputs", {}), dict):
            raise ComfyError(f"{self.url}/history's entry for prompt {prompt_id} is malformed: {str(entry)[:300]}")
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages', []))[:2000]}")
        return entry

    async def download(self, session, subfolder: str, filename: str, kind: str = "output") -> bytes:
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        async with session.get(f"{self.url}/view?{query}", timeout=self._bounded(self.timeout)) as r:
            if r.status != 200:
                raise ComfyError(f"could not download {subfolder}/{filename}: HTTP {r.status}")
            if (r.content_length or 0) > self.max_download:
                raise ComfyError(f"{subfolder}/{filename} is {r.content_length} bytes, over {self.max_download}")
            data = bytearray()
            async for piece in r.content.iter_chunked(1 << 20):  # counted as it comes: a wrong length is no escape
                data += piece
                if len(data) > self.max_download:
                    raise ComfyError(f"{subfolder}/{filename} is over {self.max_download} bytes")
            return bytes(data)
