"""One typed key per recorded array of one video, and the one function that maps a key to its file: the layout of
``docs/FORMAT.md`` in code.

=========  ===============================  ======================================================================
stat       name                             file (``uncond/`` in front for the uncond branch)
=========  ===============================  ======================================================================
cross      the word's label                 ``token_<word>/step_NNN``  (the folder ``summary.json`` names)
sink       received/key_max/frame_mass/...  ``self_attention/step_NNN[_chunk_FFF]_<name>``
image      share/received                   ``image_context/step_NNN_<name>``
window     scores/probs                     ``windows/step_NNN_block_BB[_chunk_FFF]_<name>``
=========  ===============================  ======================================================================

``chunk`` is the first latent frame of a causal chunk (None for bidirectional Wan); ``block`` is set for windows
only. Arrays that share a metadata file (a step's sink statistics, a window's scores and probabilities) differ only
in ``name``; :func:`metadata_path` gives that file.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

STATS = ("cross", "sink", "image", "window")
SINK_NAMES = ("received", "key_max", "frame_mass", "entropy")
IMAGE_NAMES = ("share", "received")  # image-context statistics (i2v): per query, per image token
WINDOW_NAMES = ("scores", "probs")
NAMES = {"sink": SINK_NAMES, "image": IMAGE_NAMES, "window": WINDOW_NAMES}
BRANCHES = ("cond", "uncond")
_FOLDERS = {"sink": "self_attention", "image": "image_context", "window": "windows"}


class _Fields(NamedTuple):
    stat: str
    name: str
    step: int
    branch: str = "cond"
    block: Optional[int] = None
    chunk: Optional[int] = None


class ArrayKey(_Fields):
    """Where one recorded array of one video sits (a tuple: keys from two loaded copies of the package compare equal,
    as ComfyUI's copy of the pack and a script's may be).

    Args:
        stat: ``cross`` (a word's token maps), ``sink`` (self-attention statistics), ``image`` (i2v image context),
            ``window`` (an exact score window).
        name: the word's label for ``cross``; the statistic's name otherwise (``received``, ``scores``, ...).
        step: the global sampling step.
        branch: ``cond`` or ``uncond`` (the rows of the CFG batch).
        block: the model block of a window; None for every other statistic (they hold a blocks axis).
        chunk: causal Wan: the first latent frame of the chunk whose queries made the array; None otherwise.
    """

    __slots__ = ()

    def __new__(cls, stat: str, name: str, step: int, branch: str = "cond", block: Optional[int] = None,
                chunk: Optional[int] = None):
        if stat not in STATS:
            raise ValueError(f"ArrayKey.stat must be one of {STATS}, got {stat!r}")
        if branch not in BRANCHES:
            raise ValueError(f"ArrayKey.branch must be one of {BRANCHES}, got {branch!r}")
        if stat in NAMES and name not in NAMES[stat]:
            raise ValueError(f"{stat} statistics are {NAMES[stat]}, got {name!r}")
        if (block is None) == (stat == "window"):
            raise ValueError("a window key names its block; no other key does")
        return super().__new__(cls, stat, name, step, branch, block, chunk)

    def order(self) -> tuple:
        """A sort key (None before any index)."""
        return (self.stat, self.name, self.step, self.branch, -1 if self.block is None else self.block,
                -1 if self.chunk is None else self.chunk)

    def group(self) -> "ArrayKey":
        """The key standing for the arrays that share this one's metadata file (its first name)."""
        return self if self.stat == "cross" else ArrayKey(self.stat, NAMES[self.stat][0], self.step, self.branch,
                                                          self.block, self.chunk)

    def as_list(self) -> list:
        """JSON form (``summary.json`` ``arrays``)."""
        return [self.stat, self.name, self.step, self.branch, self.block, self.chunk]

    @classmethod
    def from_list(cls, value) -> "ArrayKey":
        """The key of a JSON form; a malformed entry is a ValueError that says what it got."""
        if not isinstance(value, list) or len(value) != 6:
            raise ValueError(f"an array key is a list of 6 entries, got {str(value)[:80]}")
        stat, name, step, branch, block, chunk = value
        ints = [v for v in (block, chunk) if v is not None] + [step]
        if not isinstance(name, str) or any(type(v) is not int or v < 0 for v in ints):
            raise ValueError(f"malformed array key {str(value)[:80]}")
        return cls(stat, name, step, branch, block, chunk)


def _stem(key: ArrayKey, token_folder: Optional[str]) -> str:
    prefix = "" if key.branch == "cond" else f"{key.branch}/"
    if key.stat == "cross":
        if not token_folder or not re.fullmatch(r"token_[\w.-]+", token_folder):
            raise ValueError(f"the word {key.name!r} has no valid token folder ({token_folder!r})")
        return f"{prefix}{token_folder}/step_{key.step:03d}"
    block = "" if key.block is None else f"_block_{key.block:02d}"
    chunk = "" if key.chunk is None else f"_chunk_{key.chunk:03d}"
    return f"{prefix}{_FOLDERS[key.stat]}/step_{key.step:03d}{block}{chunk}"


def key_path(key: ArrayKey, token_folder: Optional[str] = None) -> str:
    """Relative path of the key's array, without its extension (``.npy``, ``.pt``, ``.gz``); ``token_folder``: the
    word's folder (``summary.json`` ``tokens[].folder``), needed for ``cross`` keys."""
    stem = _stem(key, token_folder)
    return stem if key.stat == "cross" else f"{stem}_{key.name}"


def metadata_path(key: ArrayKey, token_folder: Optional[str] = None) -> str:
    """Relative path of the metadata JSON the key's array shares with the rest of its group."""
    return f"{_stem(key, token_folder)}_metadata.json"
