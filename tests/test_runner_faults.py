"""The batch runner against misbehaving servers (loopback only, bounded): an unreachable server, HTTP errors,
malformed replies, an early websocket close, a prompt that never ends. Group: dead_server."""
import asyncio
import time
import json
import socket

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from wan_capture.batch.runner import plan_jobs, run_batch  # noqa: E402

WORKFLOW = {"1": {"class_type": "WanSaveAttention", "inputs": {}}, "2": {"class_type": "KSampler", "inputs": {"seed": 0}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeComfy:
    """/ws, /prompt, /history as ComfyUI answers them; the job's seed picks a misbehaviour."""

    def __init__(self, delay: float = 0.05):
        self.sockets, self.history, self.prompts, self.delay = {}, {}, [], delay

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.query["clientId"]] = ws
        async for _ in ws:
            pass
        return ws

    async def prompt(self, request):
        body = await request.json()
        seed = body["prompt"]["2"]["inputs"]["seed"]
        self.prompts.append(seed)
        if seed == 13:
            return web.Response(status=500, text="internal boom")
        if seed == 14:
            return web.Response(status=200, text="<html>not json</html>")
        if seed == 22:
            return web.json_response({"prompt_id": None, "number": 1})
        if seed == 25:  # random bytes, declared as UTF-8 text
            return web.Response(status=200, body=bytes(range(128, 256)) * 4, content_type="text/plain", charset="utf-8")
        if seed == 23:
            await asyncio.sleep(8)  # does not answer within the runner's timeout (2 s in the test)
        pid = f"p{len(self.prompts)}"
        video = body["prompt"]["1"]["inputs"]["prompt_id"] + f"_vid{body['prompt']['1']['inputs']['video_number']:03d}"
        files = ["b/attention_maps/big.npy"] if seed == 24 else []
        entry = {"status": {"status_str": "success"},
                 "outputs": {"1": {"attention_maps": [{"video_id": video, "status": "complete", "files": files}]}}}
        if seed == 21:
            entry = None  # /history answers {pid: null}
        if seed == 26:
            entry["outputs"]["1"]["attention_maps"][0]["files"] = None  # files: null
        ws = self.sockets[body["client_id"]]

        async def finish():
            await asyncio.sleep(self.delay)
            if seed == 99:
                return  # never finishes
            self.history[pid] = entry
            if seed == 17:
                await ws.close()  # the websocket goes away early; /history still says how it ended
                return
            await ws.send_str("not json at all")
            await ws.send_str(json.dumps([1, 2, 3]))
            await ws.send_str(json.dumps({"type": "executing", "data": {"node": None, "prompt_id": pid}}))
        asyncio.get_running_loop().create_task(finish())
        return web.json_response({"prompt_id": pid})

    async def view(self, request):
        return web.Response(body=b"\0" * (3 << 20))  # 3 MiB: over the test's download bound

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})


async def serve(fake):
    app = web.Application()
    app.router.add_get("/ws", fake.ws)
    app.router.add_post("/prompt", fake.prompt)
    app.router.add_get("/history/{pid}", fake.get_history)
    app.router.add_get("/view", fake.view)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def run(tmp_path, seeds, dead=0, healthy=1, delay=0.05, **kw):
    logs = []

    async def main():
        fake = FakeComfy(delay)
        runners, urls = [], [f"http://127.0.0.1:{free_port()}" for _ in range(dead)]  # nothing listens there
        for _ in range(healthy):
            r, url = await serve(fake)
            runners.append(r)
            urls.append(url)
        try:
            manifest = await asyncio.wait_for(run_batch(WORKFLOW, plan_jobs(["a flower"], seeds), urls, "b",
                                                        str(tmp_path), log=logs.append, backoff=0.01, **kw), 60)
        finally:
            for r in runners:
                await r.cleanup()
        return manifest, fake
    manifest, fake = asyncio.run(main())
    return manifest, fake, logs


def test_dead_server_does_not_drain_the_queue(tmp_path):
    manifest, fake, logs = run(tmp_path, [1, 2, 3, 4, 5, 6], dead=1, delay=0.3)  # slow enough to outlast retries
    assert all(e["status"] == "done" for e in manifest.videos.values()) and len(manifest.videos) == 6
    assert sorted(fake.prompts) == [1, 2, 3, 4, 5, 6]  # every job ran once, on the healthy server
    assert any("left the batch" in line for line in logs)


def test_dead_server_malformed_replies_and_http_errors_fail_one_video_each(tmp_path):
    manifest, _, _ = run(tmp_path, [1, 13, 14, 17, 2])
    by_seed = {e["job"]["seed"]: e for e in manifest.videos.values()}
    assert by_seed[13]["status"] == "failed" and "HTTP 500" in by_seed[13]["error"] and "boom" in by_seed[13]["error"]
    assert by_seed[14]["status"] == "failed" and "HTTP 200" in by_seed[14]["error"]
    assert by_seed[17]["status"] == "done"  # an early websocket close is not taken for the end: /history is
    assert by_seed[1]["status"] == by_seed[2]["status"] == "done"


def test_dead_server_timeout_is_settable_and_no_server_at_all_fails_with_why(tmp_path):
    manifest, _, _ = run(tmp_path / "a", [99, 1], timeout=0.5)
    by_seed = {e["job"]["seed"]: e for e in manifest.videos.values()}
    assert by_seed[99]["status"] == "failed" and "Timeout" in by_seed[99]["error"] and by_seed[1]["status"] == "done"
    manifest, _, _ = run(tmp_path / "b", [1, 2, 3], dead=2, healthy=0)
    assert [e["status"] for e in manifest.videos.values()] == ["failed"] * 3
    assert all(e["error"] == "no server could be reached" for e in manifest.videos.values())


def test_runner_malformed_bytes_and_null_files_fail_one_video_each(tmp_path):
    """Random bytes from POST /prompt and ``files: null`` in /history (found by the fault campaign: the runner ended
    in UnicodeDecodeError and TypeError): each fails its video saying what the server sent, the batch goes on."""
    manifest, _, _ = run(tmp_path, [25, 26, 1], timeout=5.0)
    by_seed = {e["job"]["seed"]: e for e in manifest.videos.values()}
    assert by_seed[25]["status"] == "failed" and by_seed[25]["error"].startswith("ComfyError: ")
    assert "without a prompt id" in by_seed[25]["error"]
    assert by_seed[26]["status"] == "failed" and "malformed Save Attention Maps report" in by_seed[26]["error"]
    assert by_seed[1]["status"] == "done"


def test_runner_malformed_replies_fail_one_video_each_and_every_wait_is_bounded(tmp_path):
    """{pid: null} in /history, a null prompt_id, a POST /prompt that never answers, a download over its bound: each
    fails its video with a message, the batch goes on, and nothing waits for the whole timeout."""
    t0 = time.monotonic()
    manifest, _, _ = run(tmp_path, [21, 22, 23, 24, 1], timeout=2.0, download=str(tmp_path / "dl"),
                         max_download=1 << 20)
    by_seed = {e["job"]["seed"]: e for e in manifest.videos.values()}
    assert by_seed[21]["status"] == "failed" and "malformed" in by_seed[21]["error"]
    assert by_seed[22]["status"] == "failed" and "without a prompt id" in by_seed[22]["error"]
    assert by_seed[23]["status"] == "failed" and "did not answer POST /prompt within 2 s" in by_seed[23]["error"]
    assert by_seed[24]["status"] == "failed" and "over 1048576" in by_seed[24]["error"]
    assert by_seed[1]["status"] == "done"
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "dl" / "b" / "attention_maps" / "big.npy").exists()
