"""Every path of a recording, written or read, stays inside its folder: one check, one error."""
from __future__ import annotations

import os
import re


class StorageError(OSError):
    """Writing or reading a recording's files failed; the message names the file and what was kept."""


class OutsideRoot(StorageError, PermissionError):
    """A path that resolves (symlinks included) outside the folder it must stay in."""


def confined(root: str, *parts: str, purpose: str = "read", must_exist: bool = False) -> str:
    """``root/parts...`` once it is known to stay inside ``root``: no absolute, empty or ``..`` component, no
    backslash, and inside after every symlink is resolved (else OutsideRoot). ``must_exist``: FileNotFoundError when
    nothing is there. ``purpose`` (``read``/``write``) words the message."""
    pieces = [p for part in parts for p in str(part).split("/")]
    path = os.path.join(root, *pieces)
    bad = any(p in ("", "..") or "\\" in p or os.path.isabs(p) for p in pieces)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if bad or os.path.commonpath([real_root, real]) != real_root:
        raise OutsideRoot(f"refusing to {purpose} {path!r}: it resolves outside the output folder {root!r}")
    if must_exist and not os.path.exists(real):
        raise FileNotFoundError(f"not found: {path!r}")
    return path


_UNSAFE = re.compile(r"[^\w.-]+", re.UNICODE)
# names Windows reserves for devices, in any case and with any extension: never a file or folder name
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def safe_name(name: str, fallback: str = "unnamed", limit: int = 80) -> str:
    """One path component made of letters, digits, ``_ . -`` only: no separators, no leading dots, never empty."""
    cleaned = _UNSAFE.sub("_", str(name)).strip("._ ")[:limit]
    if _RESERVED.match(cleaned):
        cleaned = "_" + cleaned
    return cleaned or fallback
