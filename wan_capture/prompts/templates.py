"""Prompt templates: ``[a|b]`` alternatives, nested and several per prompt, expanded in a stable order.

``a [red|blue] [car|bus]`` gives ``a red car``, ``a red bus``, ``a blue car``, ``a blue bus`` (the first group varies
slowest), with ids ``prompt_000``.. in that order. ``\\[``, ``\\]`` and ``\\|`` are literal characters; a ``|``
outside brackets is literal too. ComfyUI's weight syntax ``(word:1.5)`` passes through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union


class TemplateError(ValueError):
    """A template that cannot be expanded; the message gives the position."""


@dataclass(frozen=True)
class Variation:
    prompt_id: str
    prompt: str
    index: int


Node = Union[str, "Group"]


@dataclass(frozen=True)
class Group:
    options: Tuple[Tuple[Node, ...], ...]


def _parse(text: str, i: int, depth: int) -> Tuple[List[List[Node]], int]:
    """Parse options until the matching ``]`` (depth > 0) or the end; returns the options and the next index."""
    options: List[List[Node]] = [[]]
    buf = []

    def flush():
        if buf:
            options[-1].append("".join(buf))
            buf.clear()

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "[]|":
            buf.append(text[i + 1])
            i += 2
            continue
        if c == "[":
            flush()
            inner, i = _parse(text, i + 1, depth + 1)
            options[-1].append(Group(tuple(tuple(o) for o in inner)))
            continue
        if c == "]":
            if depth == 0:
                raise TemplateError(f"unbalanced ']' at position {i} in {text!r}")
            flush()
            return options, i + 1
        if c == "|" and depth > 0:
            flush()
            options.append([])
            i += 1
            continue
        buf.append(c)
        i += 1
    if depth > 0:
        raise TemplateError(f"unclosed '[' in {text!r}: every '[' needs a matching ']'")
    flush()
    return options, i


def _expand(seq: Tuple[Node, ...]) -> List[str]:
    out = [""]
    for node in seq:
        if isinstance(node, str):
            out = [o + node for o in out]
        else:
            alts = [a for option in node.options for a in _expand(option)]
            out = [o + a for o in out for a in alts]
    return out


def expand_template(template: str) -> List[Variation]:
    """Every prompt a template stands for, with stable ids ``prompt_000``..; a plain prompt gives itself."""
    options, _ = _parse(template, 0, 0)
    prompts = _expand(tuple(options[0]))
    return [Variation(f"prompt_{i:03d}", p, i) for i, p in enumerate(prompts)]
