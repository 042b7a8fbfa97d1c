"""Small helpers of the benchmarks."""
import shutil
import tempfile
import time


def save_step_seconds(wc, take) -> float:
    """Seconds to save one recorded step of ``take`` (numpy, uncompressed, to a temporary folder)."""
    folder = tempfile.mkdtemp(prefix="wan_capture_bench_")
    try:
        t0 = time.perf_counter()
        wc.save_take(take, folder, "bench", wc.SaveOptions(storage_dtype=take.plan.storage_dtype))
        return (time.perf_counter() - t0) / max(1, len(take.steps))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
