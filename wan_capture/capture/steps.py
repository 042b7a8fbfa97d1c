"""Denoising steps: which step a model evaluation belongs to, from the sampler's sigma schedule."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple


def step_of(sigma: float, schedule: Sequence[float], rel_tol: float = 1e-4) -> Tuple[Optional[int], bool]:
    """``(step, exact)`` for a model evaluated at ``sigma`` within ``schedule`` (the pass's sigmas, last one final).

    ``exact`` is True when ``sigma`` is the step's own schedule sigma; multi-evaluation samplers (Heun, DPM-2)
    also evaluate between schedule points, which belong to the step whose interval holds them (exact=False).
    Returns ``(None, False)`` when ``sigma`` lies outside the schedule.
    """
    sig = [float(s) for s in schedule]
    for i, s in enumerate(sig[:-1] if len(sig) > 1 else sig):
        if abs(s - sigma) <= rel_tol * max(abs(s), 1e-8):
            return i, True
    for i in range(len(sig) - 1):
        hi, lo = max(sig[i], sig[i + 1]), min(sig[i], sig[i + 1])
        if lo <= sigma <= hi:
            return i, False
    return None, False


def continues(previous_sigmas: Sequence[float], next_sigmas: Sequence[float], rel_tol: float = 1e-4) -> bool:
    """True when a pass starts where the previous one stopped (KSamplerAdvanced's start/end steps, two experts)."""
    if not previous_sigmas or not next_sigmas:
        return False
    a, b = float(previous_sigmas[-1]), float(next_sigmas[0])
    return a > 0 and abs(a - b) <= rel_tol * max(abs(a), 1e-8)
