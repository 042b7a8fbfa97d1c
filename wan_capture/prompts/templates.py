"""Prompt templates: ``[a|b]`` alternatives, nested and several per prompt, expanded in a stable order.

``a [red|blue] [car|bus]`` gives ``a red car``, ``a red bus``, ``a blue car``, ``a blue bus`` (the first group varies
slowest), with ids ``prompt_000``.. in that order. ``\\[``, ``\\]`` and ``\\|`` are literal characters; a ``|``
outside brackets is literal too. ComfyUI's weight syntax ``(word:1.5)`` passes through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

MAX_VARIATIONS = 10_000  # a template that stands for more prompts than this is refused: list them, not the product
MAX_DEPTH = 32  # brackets nested deeper than this are refused (before recursion runs out)
MAX_LENGTH = 50_000  # characters of one template


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
            if depth >= MAX_DEPTH:
                raise TemplateError(f"brackets nested deeper than {MAX_DEPTH} at position {i}")
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


def _count(seq: Tuple[Node, ...]) -> int:
    """How many prompts a sequence stands for (a product of its groups' counts; exact, never materialised)."""
    total = 1
    for node in seq:
        if isinstance(node, Group):
            total *= sum(_count(option) for option in node.options)
    return total


def _pick(seq: Tuple[Node, ...], index: int) -> str:
    """The ``index``-th prompt of a sequence, by mixed-radix arithmetic (the first group varies slowest)."""
    counts = [sum(_count(o) for o in n.options) if isinstance(n, Group) else 1 for n in seq]
    digits = [0] * len(seq)
    for j in range(len(seq) - 1, -1, -1):  # the last group varies fastest
        index, digits[j] = divmod(index, counts[j])
    text = []
    for node, digit in zip(seq, digits):
        if isinstance(node, str):
            text.append(node)
            continue
        for option in node.options:  # the group's prompts: its first option's, then the next option's...
            n = _count(option)
            if digit < n:
                text.append(_pick(option, digit))
                break
            digit -= n
    return "".join(text)


def _root(template: str) -> Tuple[Node, ...]:
    if len(template) > MAX_LENGTH:
        raise TemplateError(f"the template has {len(template)} characters, over {MAX_LENGTH}")
    options, _ = _parse(template, 0, 0)
    return tuple(options[0])


def count_variations(template: str) -> int:
    """How many prompts a template stands for, without expanding it."""
    return _count(_root(template))


def template_variation(template: str, index: int) -> Variation:
    """The ``index``-th prompt of a template (ids in :func:`expand_template`'s order), computed without expanding
    the others: a template of 2^40 prompts costs what one prompt costs."""
    root = _root(template)
    total = _count(root)
    if not 0 <= index < total:
        raise TemplateError(f"variation {index} does not exist: the template has {total} (0..{total - 1})")
    return Variation(f"prompt_{index:03d}", _pick(root, index), index)


def expand_template(template: str) -> List[Variation]:
    """Every prompt a template stands for, with stable ids ``prompt_000``..; a plain prompt gives itself. A template
    of more than :data:`MAX_VARIATIONS` prompts is refused with its count (pick one with :func:`template_variation`)."""
    root = _root(template)
    total = _count(root)
    if total > MAX_VARIATIONS:
        raise TemplateError(f"the template stands for {total} prompts, over {MAX_VARIATIONS}: use fewer [a|b] groups, "
                            "or pick variations one at a time")
    return [Variation(f"prompt_{i:03d}", _pick(root, i), i) for i in range(total)]
