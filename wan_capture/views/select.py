"""Choosing steps, blocks and heads of a recording: one meaning of "mean" for the nodes, the viewer and scripts.

A selection is ``None`` (every recorded index: the mean over them) or a tuple of model indices. A recorded axis is
the list of model indices it holds, or ``[-1]`` when the recording kept only their mean (``store_per_block`` /
``store_per_head`` off); asking such an axis for particular indices is a :class:`SelectionError`, never a silent mean.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from ..plan import parse_index_list

MEAN = "mean"
Selection = Optional[Tuple[int, ...]]


class SelectionError(ValueError):
    """A selection names what the recording does not hold; the message says what it holds."""


def parse_selection(value: Union[None, str, int, Sequence[int]], name: str) -> Selection:
    """``None``, ``"all"``, ``"mean"`` or ``""`` -> None (every recorded index, averaged); ``"0-3,7"``, an int or a
    list -> the tuple of those model indices."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all", MEAN)):
        return None
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        return parse_index_list(value, name)
    return tuple(int(v) for v in value)


def axis_positions(recorded: Sequence[int], wanted: Selection, name: str) -> List[int]:
    """Positions along a recorded ``name`` axis (``blocks``/``heads``) of the ``wanted`` model indices (None: all)."""
    recorded = list(recorded)
    if wanted is None:
        return list(range(len(recorded)))
    if recorded == [-1]:
        raise SelectionError(f"{name} were recorded as their mean (store_per_{name[:-1]} off): {name} {list(wanted)} "
                             f"cannot be chosen; choose 'mean', or record with store_per_{name[:-1]} on")
    missing = [w for w in wanted if w not in recorded]
    if missing:
        raise SelectionError(f"{name} {missing} were not recorded; recorded {name}: {recorded}")
    return [recorded.index(w) for w in wanted]


def chosen_steps(recorded: Sequence[int], wanted: Optional[Sequence[int]]) -> List[int]:
    """The steps to show: every recorded one for None; each wanted one must have been recorded."""
    chosen = list(recorded) if wanted is None else list(wanted)
    missing = [s for s in chosen if s not in recorded]
    if missing or not chosen:
        raise SelectionError(f"steps {missing or chosen} were not recorded/saved; available steps: {list(recorded)}")
    return chosen
