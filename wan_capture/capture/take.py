"""One generation's recording: a keyed store of arrays (:mod:`.store`) and what is needed to read them.

A take is one sampling pass, or several chained when a pass starts where the previous one stopped (KSamplerAdvanced's
start/end steps, Wan 2.2 A14B's two experts); :mod:`.passes` keeps them. Arrays (host memory, ``plan.storage_dtype``
except windows, which stay float32), read through the store or the dictionaries below:

* ``take.cross[(step, branch)]``: ``[batch, blocks', heads', spatial', T]`` text cross-attention probabilities of
  the tracked positions ``plan.positions(branch)`` (the negative prompt's for uncond), then one summed column per
  group of ``plan.sums(branch)`` (T in all); ``blocks'`` is ``take.blocks`` or 1 (mean over blocks when
  ``store_per_block`` is off), ``heads'`` is ``take.heads`` or 1 (mean), ``spatial'`` the latent tokens after
  ``spatial_downsample_factor`` pooling (``take.map_grid``).
* ``take.sink[(step, branch)][name]``: ``received``/``key_max`` ``[batch, blocks', heads', keys]``, ``frame_mass``
  ``[batch, blocks', heads', Fq, Fk]``, ``entropy`` ``[batch, blocks', heads', Fq]``; aggregation over blocks/heads
  is the mean, except ``key_max`` which takes the max.
* ``take.image[(step, branch)][name]`` (i2v with ``record_image_context``): ``share`` ``[batch, blocks', heads',
  tokens]`` and ``received`` ``[batch, blocks', heads', image tokens]``.
* ``take.windows[(step, block, branch)]``: ``scores``/``probs`` ``[batch, heads, nq, nk]`` float32 and the token ranges
  ``q_range``/``k_range`` (``q_frames``/``k_frames``: absolute latent frames of its rows/columns).

Causal Wan (a KV cache, chunks of frames): ``take.chunks[first_query_frame]`` reads one chunk's arrays as above
(its keys are those the chunk attended to, whose absolute frames are ``chunk.key_frames[(step, block)]``);
``take.cross`` is the whole video's token maps, laid along time; ``take.kv_events`` is the KV-cache log and
``take.step_pass[step]`` ``"denoise"`` or ``"context"`` (the clean-frame pass that refills the cache).
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Dict, List, Optional, Tuple

from ..grid import Grid
from ..model_info import ModelInfo
from ..plan import RecordingPlan
from .budget import Budget, bytes_per_step
from .collect import Collector
from .passes import PassLog
from .store import ArrayStore, ChunkView
from .time_layout import TimeLayout

_take_ids = itertools.count(1)
# earlier names of the pass log's fields, read through the take
_LOG_FIELDS = {"passes": "passes", "pass_weights": "weights", "pass_outputs": "outputs", "sampling": "sampling",
               "step_sigmas": "step_sigmas", "step_timesteps": "step_timesteps", "total_steps": "total_steps",
               "input_fingerprint": "input_fingerprint", "output_fingerprint": "output_fingerprint"}


class Take:
    """One generation's recording (see the module docstring)."""

    def __init__(self, plan: RecordingPlan, model):
        self.id = next(_take_ids)
        self.plan = plan
        self.info: Optional[ModelInfo] = model if isinstance(model, ModelInfo) else None
        self.model = model.as_dict() if isinstance(model, ModelInfo) else dict(model)
        self.status = "recording"  # then "complete", or "partial" when a pass failed or was interrupted
        self.error: Optional[str] = None
        self.grid: Optional[Grid] = None
        self.text_len: Optional[int] = None
        self.batch: Optional[int] = None  # rows per branch: one per video
        self.time_layout = TimeLayout()  # latent frames that are references or context, not video frames
        self.skipped: Counter = Counter()
        self.not_recorded: Dict[str, str] = {}  # kinds of attention call deliberately not recorded -> why
        self.kv_events: List[dict] = []  # causal Wan: the KV-cache log
        self.step_pass: Dict[int, str] = {}  # causal Wan: "denoise" or "context"
        self.kv_design: Dict[str, str] = {}  # causal Wan: the cache design recorded (adapters.cache_designs)
        self.chunk_prompts: Dict[int, Dict[str, List[int]]] = {}  # causal Wan: chunk -> branch -> prompt numbers
        self.store = ArrayStore()
        self.log = PassLog()
        self.budget = Budget(plan)
        self.collector = Collector(self)

    def __getattr__(self, name: str):
        if name in _LOG_FIELDS:
            return getattr(self.__dict__["log"], _LOG_FIELDS[name])
        raise AttributeError(f"'Take' object has no attribute {name!r}")

    # -- geometry ----------------------------------------------------------------------------------------
    @property
    def blocks(self) -> Tuple[int, ...]:
        """Block indices along the blocks axis (``(-1,)`` means the mean/max over all selected blocks)."""
        return self.plan.selected_blocks(self.model["num_blocks"]) if self.plan.store_per_block else (-1,)

    @property
    def heads(self) -> Tuple[int, ...]:
        return self.plan.selected_heads(self.model["num_heads"]) if self.plan.store_per_head else (-1,)

    @property
    def map_grid(self) -> Optional[Grid]:
        return None if self.grid is None else self.grid.pooled(self.plan.spatial_downsample_factor)

    @property
    def steps(self) -> List[int]:
        return self.store.steps()

    @property
    def causal(self) -> bool:
        """True for a recording of causal Wan: its arrays are per chunk."""
        return bool(self.store.chunk_grids)

    # -- the arrays, by their earlier dictionaries ----------------------------------------------------------
    @property
    def cross(self):
        return self.store.cross()

    @property
    def sink(self):
        return self.store.stats("sink")

    @property
    def image(self):
        return self.store.stats("image")

    @property
    def windows(self):
        return self.store.windows()

    @property
    def chunks(self) -> Dict[int, ChunkView]:
        pool = self.plan.spatial_downsample_factor
        return {c: ChunkView(self.store, c, pool) for c in sorted(self.store.chunk_grids)}

    # -- recording ---------------------------------------------------------------------------------------
    def record(self, call, q, k, lse=None) -> None:
        """Statistics of one attention call into the store (see :class:`.collect.Collector`)."""
        self.collector.record(call, q, k, lse)

    def log_kv(self, event: dict) -> None:
        """Append a KV-cache event (causal Wan)."""
        self.kv_events.append(dict(event))

    def finish_pass(self, ok: bool, error: Optional[str] = None) -> None:
        """The pass's statistics into the store; the take complete, or partial when the pass did not finish."""
        self.collector.finish()
        if not ok:
            self.status, self.error = "partial", error or "sampling did not finish"
        elif self.status == "recording":
            self.status = "complete"

    def experts(self) -> List[dict]:
        """The experts of a take whose passes ran different weights (Wan 2.2 A14B), each with its steps."""
        return self.log.experts()

    def truncated(self, passes: int) -> "Take":
        """A new take holding this one's first ``passes`` passes (arrays shared, not copied): where a later pass is
        sampled again from the same latent (a re-queued graph whose first expert ComfyUI took from its cache)."""
        t = Take(self.plan, self.info or self.model)
        t.log = self.log.truncated(passes)
        t.store = self.store.before(self.log.boundary(passes))
        t.grid, t.text_len, t.batch, t.time_layout = self.grid, self.text_len, self.batch, self.time_layout
        t.not_recorded = dict(self.not_recorded)
        t.status = "complete"
        t.budget.reserved = t.nbytes()
        return t

    def nbytes(self) -> int:
        """Host bytes the take's recorded arrays hold now."""
        return self.store.nbytes() + self.collector.nbytes()

    def bytes_per_step(self, grid: Grid, batch: int, keys: Optional[int] = None) -> int:
        """Host bytes one recorded step takes (``keys``: self-attention keys, the grid's tokens unless cached)."""
        window = None
        if self.plan.window is not None:
            (q0, q1), (k0, k1) = self.collector.window_ranges(grid)
            window = (q1 - q0, k1 - k0)
        return bytes_per_step(self.plan, self.model["num_blocks"], self.model["num_heads"], grid, batch, keys, window)

    def summary(self) -> dict:
        """A JSON-able description of the take (what nodes show and metadata starts from)."""
        return {
            "take": self.id, "status": self.status, "error": self.error,
            "grid": None if self.grid is None else self.grid.as_list(),
            "map_grid": None if self.map_grid is None else self.map_grid.as_list(),
            "batch": self.batch, "total_steps": self.log.total_steps, "recorded_steps": self.steps,
            "blocks": list(self.blocks), "heads": list(self.heads), "text_positions": list(self.plan.text_positions),
            "text_len": self.text_len, "model": self.model, "sampling": self.log.sampling,
            "skipped": dict(self.skipped), "chunks": sorted(self.store.chunk_grids) or None,
            **({"not_recorded": dict(self.not_recorded)} if self.not_recorded else {}),
        }
