"""Small synchronous helpers for talking to the test server."""
import json
import time
import urllib.request


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.load(r)


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_prompt(url, prompt, timeout=300):
    status, body = post(url + "/prompt", {"prompt": prompt})
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = get(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            return hist[pid]
        time.sleep(0.3)
    raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")


def wait_idle(url, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = get(url + "/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.3)
    raise TimeoutError("the server queue did not drain")


def execution_errors(entry) -> list:
    """The execution errors of a ``/history`` entry as dicts with ``exception_message``: upstream ComfyUI lists
    ``[event, {...}]`` pairs, hiddenswitch's lists strings ``"execution_error: <message>"``."""
    out = []
    for m in entry.get("status", {}).get("messages", []):
        if isinstance(m, str):
            if m.startswith("execution_error:"):
                out.append({"exception_message": m[len("execution_error:"):].strip()})
        elif m and m[0] == "execution_error":
            out.append(m[1])
    return out


def error_of(entry) -> str:
    """The last execution error's message of a ``/history`` entry ('' when none)."""
    errors = execution_errors(entry)
    return errors[-1].get("exception_message", "") if errors else ""
