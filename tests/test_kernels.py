"""Triton kernels against the float64 reference: on CUDA when there is a GPU, and always through Triton's CPU
interpreter on small shapes (so the kernels' indexing and masking are checked in CI too)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", WAN_CAPTURE_BACKEND="triton")
    # NumPy >= 2.5 refuses int() of 1-element arrays, which older Triton interpreters do; NumPy 2.4 only warns:
    # turning that warning into an error makes this test fail here the way it fails there
    strict = ["-W", "error:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"]
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE])  # the package root and tests/
    out = subprocess.run([sys.executable, *strict, os.path.join(HERE, "kernel_cases.py"), "cpu", "float32"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok worst relative error" in out.stdout


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tests: no CUDA device here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_kernels_on_cuda(dtype):
    import kernel_cases  # tests/ is on the path (pyproject's pythonpath)
    kernel_cases.main("cuda", dtype)


@needs_triton
def test_sweep_kernel_variants_against_float64_under_the_interpreter():
    """The issue-36 sweep variants (bench/sweep_variants.py) compute the shipped sweep's statistics: the software-
    pipelined Triton kernel against float64 at two tile shapes, with partial key and query tiles (CPU interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(HERE))
    out = subprocess.run([sys.executable, "-m", "bench.sweep_variants", "--check"], env=env, cwd=os.path.dirname(HERE),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok worst relative error" in out.stdout, out.stdout + out.stderr


@needs_triton
def test_sweep_kernel_variants_on_cuda():
    """On an sm_90 GPU the same check covers the Gluon kernel too (bf16, head_dim 128, three shapes, run twice)."""
    if not torch.cuda.is_available():
        pytest.skip("SWEEP KERNEL GPU TEST SKIPPED: no CUDA device here (bench/sweep_variants.py --check on a GPU)")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    out = subprocess.run([sys.executable, "-m", "bench.sweep_variants", "--check"], env=env, cwd=os.path.dirname(HERE),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok worst relative error" in out.stdout, out.stdout + out.stderr


@needs_triton
def test_sweep_kernel_quad_writes_compiled_for_sm90():
    """The shipped sweep compiled for sm_90 here, no GPU needed (Triton's bundled ptxas): with ``QUAD`` its score
    tiles have the layout the quad writes assume (MMA v3, the 4 warps along the keys), the first lane of each quad
    adds each key's sum and stores its max (PTX), and its hot loop has fewer barriers than the conversion path's
    (bench/README.md, issue 36). With 8 warps the warps also split the queries, so a key's row sits in two warps:
    the layout check refuses that kernel, and ``sweep`` then runs it without ``QUAD``."""
    from bench import sweep_sass
    from wan_capture.stats import kernels as K

    def compiled(quad, warps=4, bm=128, stages=3):
        c = sweep_sass.compile_sm90(K._sweep_kernel, dict(CAUSAL=0, BLOCK_M=bm, BLOCK_N=64, QUAD=quad), warps, stages)
        return c, sweep_sass.hot_loop(sweep_sass.sass_and_resources(c)[0])[1]

    quad, quad_ops = compiled(True)
    plain, plain_ops = compiled(False)
    assert K._quad_layout(quad.asm["ttgir"]) and K._quad_layout(plain.asm["ttgir"])
    assert "@go red.relaxed.gpu.global.add.f32" in quad.asm["ptx"] and "@go st.global.f32" in quad.asm["ptx"]
    assert "@go" not in plain.asm["ptx"]
    assert quad_ops["BAR"] < plain_ops["BAR"], (quad_ops, plain_ops)
    wide, _ = compiled(True, warps=8, bm=256, stages=2)
    assert "warpsPerCTA = [4, 2]" in wide.asm["ttgir"] and not K._quad_layout(wide.asm["ttgir"])


@needs_triton
def test_sweep_kernel_quad_refused_layout_reruns_on_cuda(monkeypatch):
    """Where the compiled kernel's layout is not the one ``QUAD`` assumes, ``sweep`` discards what it wrote, runs the
    kernel again without it (the same bits as ``quad=False``) and does not try ``QUAD`` for that kernel again."""
    if not torch.cuda.is_available():
        pytest.skip("SWEEP KERNEL GPU TEST SKIPPED: no CUDA device here (the QUAD fallback needs a launch)")
    from wan_capture import KeyLayout
    from wan_capture.stats import kernels as K
    g = torch.Generator().manual_seed(5)
    q, k = ((torch.randn(1, 2, 700, 128, generator=g) * 1.5).to(torch.bfloat16).cuda() for _ in range(2))
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 128 ** -0.5, -1).float().reshape(2, 700)
    want = K.sweep(q, k, 128 ** -0.5, KeyLayout(), 300, lse, quad=False)
    monkeypatch.setattr(K, "_NOT_QUAD", set())
    monkeypatch.setattr(K, "_quad_layout", lambda ttgir: False)
    got = K.sweep(q, k, 128 ** -0.5, KeyLayout(), 300, lse)  # QUAD where wanted: sm_90, bf16, 4 warps
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert bool(K._NOT_QUAD) == K._quad_wanted(q, 4, 64)


@needs_triton
def test_sweep_kernel_folded_accumulators_compiled_for_sm90():
    """The folded sweep variant (bench/sweep_variants.py ``_hot_loop_kernel`` with ``FOLD``, issue 36) compiled for
    sm_90 here: each query's sums over keys ``r`` and ``r + 8`` are added in the thread that holds both in the ``wgmma``
    layout, so the fold adds no shared-memory traffic to the hot loop, and at the register cap that lets three
    programs share a multiprocessor (168) it spills far less than the unfolded kernel at the same cap; three
    programs' shared memory fits an sm_90 multiprocessor (227 KiB)."""
    import re

    from bench import sweep_sass
    from bench import sweep_variants as V
    from wan_capture.stats import kernels as K

    def compiled(fn, const, stages, cap):
        c = sweep_sass.compile_sm90(fn, dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, **const), 4, stages, cap)
        sass, res = sweep_sass.sass_and_resources(c)
        return c, int(re.search(r"REG:(\d+)", res).group(1)), sweep_sass.hot_loop(sass)[1]

    _, regs_shipped, shipped = compiled(K._sweep_kernel, dict(CAUSAL=0), 3, None)
    c, regs, folded = compiled(V._hot_loop_kernel, dict(FOLD=True, TMA=False), 2, 168)
    _, _, unfolded = compiled(K._sweep_kernel, dict(CAUSAL=0), 2, 168)
    assert K._quad_layout(c.asm["ttgir"])
    for op in ("STS", "LDS"):
        assert folded.get(op, 0) == shipped.get(op, 0), (folded, shipped)
    assert regs <= 168 < regs_shipped
    assert 3 * c.metadata.shared <= 227 * 1024
    assert folded.get("LDL", 0) * 3 / 2 < unfolded.get("LDL", 0), (folded, unfolded)
    assert folded["MUFU"] == shipped["MUFU"] and folded["HGMMA"] == shipped["HGMMA"]
