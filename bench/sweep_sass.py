"""The sweep kernels compiled for sm_90 (H100/H200) on any machine, no GPU needed: registers, stack, and the hot loop's
instruction mix from the SASS (Triton's bundled ptxas and cuobjdump). What the GPU will run, before a lease is spent.

    python -m bench.sweep_sass            # the shipped sweep and the variants of bench/sweep_variants.py

Run it with the Triton the GPU machine has (3.6 there) for its exact SASS: ``PYTHONPATH=<site with triton 3.6>``.
Integer arguments and pointers get the divisibility-by-16 hint Triton's launcher gives them at Wan's shapes
(strides of ``[B, L, H*128]`` views), so the loads are vectorised as they are on the GPU.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from wan_capture.stats import kernels as K

from . import sweep_gluon as G
from . import sweep_variants as V

POINTERS_BF16 = ("Q", "K", "K_")
INT_ARGS_DIVISIBLE = ("sq_r", "sq_h", "sq_l", "sk_r", "sk_h", "sk_l")  # strides of [B, L, H*128] views: multiples of 16
CASES = [
    ("shipped", K._sweep_kernel, dict(CAUSAL=0, BLOCK_M=128, BLOCK_N=64, QUAD=True), 4, 3),
    ("shipped, per-key results through a layout conversion (QUAD off)", K._sweep_kernel,
     dict(CAUSAL=0, BLOCK_M=128, BLOCK_N=64, QUAD=False), 4, 3),
    ("pipelined 128x64, 3 stages", V._pipelined_kernel, dict(BLOCK_M=128, BLOCK_N=64), 4, 3),
    ("pipelined 128x64, 2 stages", V._pipelined_kernel, dict(BLOCK_M=128, BLOCK_N=64), 4, 2),
    ("pipelined 64x64, 3 stages", V._pipelined_kernel, dict(BLOCK_M=64, BLOCK_N=64), 4, 3),
    ("key tiles by TMA (128x64, 3 stages)", V._hot_loop_kernel,
     dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, FOLD=False, TMA=True), 4, 3),
    ("folded per-query sums, 2 stages, registers capped at 168", V._hot_loop_kernel,
     dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, FOLD=True, TMA=False), 4, 2, 168),
    ("folded per-query sums, 2 stages, registers capped at 160", V._hot_loop_kernel,
     dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, FOLD=True, TMA=False), 4, 2, 160),
    ("folded per-query sums, key tiles by TMA, 2 stages, registers capped at 168", V._hot_loop_kernel,
     dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, FOLD=True, TMA=True), 4, 2, 168),
    ("folded per-query sums, 3 stages, no cap", V._hot_loop_kernel,
     dict(BLOCK_M=128, BLOCK_N=64, QUAD=True, FOLD=True, TMA=False), 4, 3),
    ("shipped, 8 warps 256x64", K._sweep_kernel, dict(CAUSAL=0, BLOCK_M=256, BLOCK_N=64, QUAD=False), 8, 2),
] + [(f"shipped at {bm}x64, registers capped at {cap or 'none'}", K._sweep_kernel,
       dict(CAUSAL=0, BLOCK_M=bm, BLOCK_N=64, QUAD=True), 4, stages, cap)
      for bm, stages, cap in ((128, 2, 168), (64, 2, None), (64, 2, 128), (64, 3, 128), (64, 2, 168))] \
    + [(f"frame tails, {frames} frames of {slots} slots", K._frame_tail_kernel,
       dict(BLOCK_M=128, BLOCK_N=64, TAIL_N=slots, FRAMES=frames), 4, 3)
      for frames, slots in ((1, 32), (2, 32), (4, 16), (4, 32))] \
    + ([("Gluon, async wgmma (128x64, 3 stages)", G._gluon_sweep_kernel,
       dict(BM=G.BLOCK_M, BN=G.BLOCK_N, NS=G.STAGES, SYNC=False), G.WARPS, 1),
      ("Gluon, one warpgroup (128x64, 3 stages)", G._gluon_sweep_kernel,
       dict(BM=G.BLOCK_M, BN=G.BLOCK_N, NS=G.STAGES, SYNC=True), 4, 1)] if G.gluon is not None else [])


def compile_sm90(fn, const: dict, warps: int, stages: int, maxnreg=None):
    names = fn.arg_names
    gluon = getattr(fn, "is_gluon", lambda: False)()
    # a constexpr left out takes its default, as a launch would (not a runtime integer, which compiles both branches)
    const = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **const}
    const = dict(const, D=128) if gluon else dict(const, IEEE=False, D=128, KEY_MAX=True, sq_d=1, sk_d=1)
    const = {k: v for k, v in const.items() if k in names}
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "K_desc":
            sig[n] = f"tensordesc<bf16[{const['BLOCK_N']}, 128]>"
        elif n in POINTERS_BF16:
            sig[n] = "*bf16"
        elif n.isupper() and len(n) > 1:
            sig[n] = "*fp32"
        elif n == "c":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    hinted = [n for n in names if sig[n].startswith("*") or n in INT_ARGS_DIVISIBLE]
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        Source = ASTSource
    src = Source(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_and_resources(compiled) -> tuple[str, str]:
    """A compiled kernel's SASS and its resource usage (registers, stack), from Triton's bundled ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return tuple(subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True).stdout
                     for flag in ("-sass", "-res-usage"))

def hot_loop(sass: str):
    """The innermost loop with a matrix instruction (the smallest backward branch around an HGMMA): its length and
    instruction mix, and whether its HGMMA is waited for at once (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` right after)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\)|)0x([0-9a-f]+)", text)
        if "BRA" in text and m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body):
                loops.append(body)
    body = min(loops, key=len)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    last = max(i for i, t in enumerate(body) if "HGMMA" in t)
    waited_at_once = any("DEPBAR.LE gsb0, 0x0" in t for t in body[last + 1:last + 3])
    exp_after_mma = sum("MUFU.EX2" in t for t in body[last:])
    return len(body), ops, waited_at_once, exp_after_mma


def main() -> int:
    print(f"Triton {triton.__version__}, sm_90")
    for name, fn, const, warps, stages, *cap in CASES:
        try:
            c = compile_sm90(fn, const, warps, stages, *cap)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported
            print(f"{name}: does not compile ({type(e).__name__}: {str(e)[:200]})")
            continue
        sass, res = sass_and_resources(c)
        regs = re.search(r"REG:(\d+) STACK:(\d+)", res)
        n, ops, waited, exp_after = hot_loop(sass)
        mix = ", ".join(f"{k} {ops[k]}" for k in ("HGMMA", "MUFU", "FADD", "FFMA", "FMNMX", "LDGSTS", "LDL", "STL",
                                                    "BAR", "STS", "LDS", "REDG", "STG") if ops.get(k))
        print(f"{name} ({warps} warps, {stages} stages): {regs.group(1)} registers, stack {regs.group(2)} B, shared "
              f"{c.metadata.shared} B; hot loop {n} instructions ({mix}); its HGMMA waited for at once: {waited}; "
              f"exponentials after the HGMMA issue: {exp_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
