"""What to record: the recording plan, validated when it is built."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

BRANCHES = ("cond", "uncond", "both")
MAX_INDICES = 65536  # no Wan model, schedule or context has more blocks, heads, steps or positions than this
DTYPES = ("float16", "float32")
MIB = 1024 * 1024


class PlanError(ValueError):
    """A recording plan field is invalid; the message names the field and why."""


def _fail(field_name: str, why: str) -> None:
    raise PlanError(f"RecordingPlan.{field_name}: {why}")


def short(values, limit: int = 60) -> str:
    """A value for an error message, cut to ``limit`` characters (messages land in /history and the websocket)."""
    text = repr(list(values)) if isinstance(values, (list, tuple, range)) else repr(values)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _int_tuple(name: str, values, minimum: int = 0) -> Optional[Tuple[int, ...]]:
    if values is None:
        return None
    try:
        if len(values) > MAX_INDICES:
            _fail(name, f"{len(values)} entries is more than the {MAX_INDICES} any Wan model or schedule has")
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        _fail(name, f"expected a list of integers, got {short(values)}")
    if any(v < minimum for v in out):
        _fail(name, f"every entry must be >= {minimum}, got {short(out)}")
    if len(set(out)) != len(out):
        _fail(name, f"entries must be unique, got {short(out)}")
    return out


@dataclass(frozen=True)
class FrameWindow:
    """An exact score window: query latent frames [q_start, q_stop) against key frames [k_start, k_stop).

    ``k_stop=None`` means up to the last key; frames count in the key sequence's own (absolute) frames.
    """

    q_start: int
    q_stop: int
    k_start: int = 0
    k_stop: Optional[int] = None

    def __post_init__(self):
        if not 0 <= self.q_start < self.q_stop:
            _fail("window", f"query frames must satisfy 0 <= start < stop, got [{self.q_start}, {self.q_stop})")
        if self.k_start < 0 or (self.k_stop is not None and self.k_stop <= self.k_start):
            _fail("window", f"key frames must satisfy 0 <= start < stop, got [{self.k_start}, {self.k_stop})")


@dataclass(frozen=True)
class RecordingPlan:
    """Everything the recorder needs to know before sampling starts.

    Steps are global sampling steps (0 = first model evaluation at the highest sigma); blocks and heads are
    model indices. ``None`` for blocks/heads/steps means all of them.

    Args:
        text_positions: umt5 context positions whose cross-attention maps the cond rows keep (a tracker's words).
        negative_positions: the negative prompt's positions, kept for the uncond rows (they attend to the negative
            context); needed to record uncond cross maps.
        text_sums: groups of positions kept as one column of summed attention each, after the positions' columns
            (the ``<padding>`` entry: the mass the padding receives).
        negative_sums: the same for the uncond rows.
        record_cross: keep the text cross-attention maps of the tracked positions.
        record_sink_stats: keep self-attention sink statistics (attention received and max score per key,
            query-frame x key-frame mass, entropy per query frame).
        record_key_max: with the sink statistics, also the max pre-softmax score each key receives. Off: no
            ``key_max`` arrays, and the GPU sweep skips that per-key max (7% of its time at Wan 1.3B's shape, 10%
            at 14B's: bench/README.md).
        window: an exact window of pre-softmax scores and probabilities (:class:`FrameWindow`), or None.
        record_image_context: i2v/FLF2V/camera models: the image tokens' share of each query's attention and each
            CLIP-vision token's attention received.
        blocks: the blocks to record (None: all).
        heads: the heads to record (None: all).
        steps: the steps to record (None: every ``storage_interval``-th).
        storage_interval: with ``steps`` None, record every n-th step.
        branch: the CFG rows to record: ``cond``, ``uncond`` or ``both``.
        store_per_block: keep each block's arrays (off: their mean; the max for ``key_max``).
        store_per_head: keep each head's arrays (off: their mean; the max for ``key_max``).
        storage_dtype: ``float16`` or ``float32`` for the kept arrays (exact windows stay float32).
        spatial_downsample_factor: average-pool the token maps' latent cells by this factor in height and width.
        memory_budget_mb: host memory every recording the recorder keeps may take; checked before recording starts
            and refused with the size it needs.
        chunk_budget_mb: transient scores held at once on the attention's device (the statistics' working set).
        extra: free-form labels carried into metadata (the trackers' words under ``tokens``/``negative_tokens``).
    """

    text_positions: Tuple[int, ...] = ()
    negative_positions: Optional[Tuple[int, ...]] = None
    text_sums: Tuple[Tuple[int, ...], ...] = ()
    negative_sums: Tuple[Tuple[int, ...], ...] = ()
    record_cross: bool = True
    record_sink_stats: bool = False
    record_key_max: bool = True
    window: Optional[FrameWindow] = None
    record_image_context: bool = False
    blocks: Optional[Tuple[int, ...]] = None
    heads: Optional[Tuple[int, ...]] = None
    steps: Optional[Tuple[int, ...]] = None
    storage_interval: int = 1
    branch: str = "cond"
    store_per_block: bool = True
    store_per_head: bool = False
    storage_dtype: str = "float16"
    spatial_downsample_factor: int = 1
    memory_budget_mb: float = 4096.0
    chunk_budget_mb: float = 256.0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "text_positions", _int_tuple("text_positions", self.text_positions) or ())
        if self.negative_positions is not None:
            set_(self, "negative_positions", _int_tuple("negative_positions", self.negative_positions))
        for name in ("text_sums", "negative_sums"):
            set_(self, name, tuple(_int_tuple(name, g) for g in getattr(self, name) or ()))
        set_(self, "blocks", _int_tuple("blocks", self.blocks))
        set_(self, "heads", _int_tuple("heads", self.heads))
        set_(self, "steps", _int_tuple("steps", self.steps))
        if self.record_cross and self.branch != "uncond" and not (self.text_positions or self.text_sums):
            _fail("text_positions", "record_cross is on but no text positions are tracked; "
                  "give positions (e.g. from the Weighted Token Tracker) or turn record_cross off")
        if self.branch not in BRANCHES:
            _fail("branch", f"must be one of {BRANCHES}, got {self.branch!r}")
        if self.record_cross and self.branch != "cond" and not (self.negative_positions or self.negative_sums):
            _fail("negative_positions", "uncond rows attend to the negative prompt, so their cross-attention maps "
                  "need the negative prompt's tracked words: give the Weighted Token Tracker the negative prompt "
                  "as 'negative_text' (its 'negative' output feeding the sampler), or record branch 'cond' (sink "
                  "statistics and windows of uncond need no words)")
        if not (self.record_cross or self.record_sink_stats or self.window or self.record_image_context):
            _fail("record_cross", "nothing to record: enable cross maps, sink statistics or a window")
        if self.blocks == () or self.heads == () or self.steps == ():
            _fail("blocks/heads/steps", "an empty selection records nothing; use None for all")
        if int(self.storage_interval) < 1:
            _fail("storage_interval", f"must be >= 1, got {self.storage_interval}")
        if self.steps is not None and self.storage_interval != 1:
            _fail("storage_interval", "give either an explicit step list or an interval, not both")
        if self.storage_dtype not in DTYPES:
            _fail("storage_dtype", f"must be one of {DTYPES}, got {self.storage_dtype!r}")
        if int(self.spatial_downsample_factor) < 1:
            _fail("spatial_downsample_factor", f"must be >= 1, got {self.spatial_downsample_factor}")
        for name in ("memory_budget_mb", "chunk_budget_mb"):
            if not float(getattr(self, name)) > 0:
                _fail(name, f"must be > 0, got {getattr(self, name)}")
        if self.window is not None and not isinstance(self.window, FrameWindow):
            _fail("window", f"expected a FrameWindow, got {type(self.window).__name__}")

    # -- selection helpers used by the recorder --------------------------------------------------
    def wants_step(self, step: int) -> bool:
        if self.steps is not None:
            return step in self.steps
        return step % self.storage_interval == 0

    def wants_block(self, block: int) -> bool:
        return self.blocks is None or block in self.blocks

    def selected_blocks(self, num_blocks: int) -> Tuple[int, ...]:
        return tuple(b for b in range(num_blocks) if self.wants_block(b))

    def check_model(self, num_blocks: int, num_heads: int) -> None:
        """Refuse, before sampling starts, blocks or heads the model does not have."""
        for name, values, count in (("blocks", self.blocks, num_blocks), ("heads", self.heads, num_heads)):
            bad = [v for v in (values or ()) if v >= count]
            if bad:
                _fail(name, f"{name} {short(bad)} do not exist: the model has {count} {name} (0..{count - 1})")

    def check_schedule(self, first_step: int, steps: int) -> None:
        """Refuse, before sampling starts, steps past the end of a schedule that cannot be continued."""
        bad = [s for s in (self.steps or ()) if s >= first_step + steps]
        if bad:
            _fail("steps", f"steps {short(bad)} do not exist: the sampling has {first_step + steps} steps "
                           f"(0..{first_step + steps - 1})")

    def selected_heads(self, num_heads: int) -> Tuple[int, ...]:
        if self.heads is None:
            return tuple(range(num_heads))
        bad = [h for h in self.heads if h >= num_heads]
        if bad:
            _fail("heads", f"heads {bad} do not exist: the model has {num_heads} heads (0..{num_heads - 1})")
        return self.heads

    def positions(self, branch: str) -> Tuple[int, ...]:
        """The context positions whose cross maps are kept for ``branch``'s rows (each attends to its own prompt)."""
        return self.text_positions if branch == "cond" else (self.negative_positions or ())

    def sums(self, branch: str) -> Tuple[Tuple[int, ...], ...]:
        """Position groups summed into one column each for ``branch``'s rows (after its positions' columns)."""
        return self.text_sums if branch == "cond" else self.negative_sums

    def branch_names(self) -> Tuple[str, ...]:
        return ("cond", "uncond") if self.branch == "both" else (self.branch,)

    @property
    def torch_dtype(self):
        import torch
        return torch.float16 if self.storage_dtype == "float16" else torch.float32

    @property
    def memory_budget_bytes(self) -> int:
        return int(float(self.memory_budget_mb) * MIB)

    @property
    def chunk_budget_bytes(self) -> int:
        return int(float(self.chunk_budget_mb) * MIB)


def parse_index_list(text: str, field_name: str = "indices") -> Optional[Tuple[int, ...]]:
    """Parse ``"0,2,5-7"`` into ``(0, 2, 5, 6, 7)``; empty or ``"all"`` gives None (all)."""
    text = (text or "").strip().lower()
    if text in ("", "all", "*"):
        return None
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            _fail(field_name, f"cannot read {short(part, 30)} in {short(text)}: use numbers and ranges like '0,2,5-7'")
        if hi - lo + 1 + len(out) > MAX_INDICES:  # bounded before anything is expanded
            _fail(field_name, f"{short(text)} names more than {MAX_INDICES} indices: no Wan model, schedule or "
                              "context has that many")
        out.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(out))


def parse_steps(text: str, field_name: str = "steps") -> Tuple[Optional[Tuple[int, ...]], int]:
    """``"all"``, ``"0-9,20"`` or ``"every 5"`` -> (explicit steps or None, interval)."""
    m = re.fullmatch(r"\s*every\s+(\d+)\s*", text or "", flags=re.I)
    if m:
        if int(m.group(1)) < 1:
            _fail(field_name, f"'every N' needs N >= 1, got {text!r}")
        return None, int(m.group(1))
    return parse_index_list(text, field_name), 1
