"""Which context positions belong to which prompt word: tracking specs built from the tokenizer's own output.

ComfyUI's ``clip.tokenize(text, return_word_ids=True)`` gives ``(token, weight, word_id)`` per context position, where
the word id numbers weighted *segments* (``a beautiful (flower:2.5) near`` has three), and sentencepiece splits each
segment into pieces. Words are recovered from the pieces: a piece starting with ``▁`` starts a word, later pieces
continue it (a lone ``▁`` piece belongs to the word after it), and pieces made only of punctuation belong to no word. The map of a word with several pieces is the
mean over its pieces (``AttentionAnalyzer`` and the heatmap use that); the stored arrays keep every piece.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

WORD_START = "\u2581"  # sentencepiece's word-boundary marker
MODES = ("weighted", "listed", "both")
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$", re.UNICODE)


class TrackingError(ValueError):
    """A requested word cannot be tracked; the message lists what can."""


def clean_word(text: str) -> str:
    """Lowercase, ``▁`` and edge punctuation removed: the name a word is tracked and stored under."""
    return _EDGE_PUNCT.sub("", text.replace(WORD_START, " ").strip()).lower()


@dataclass(frozen=True)
class TrackedWord:
    """One occurrence of a word in the context: its pieces' ids, texts and positions, and its prompt weight."""

    label: str  # the clean word, with _2, _3... for later occurrences
    word: str
    token_ids: Tuple[int, ...]
    token_texts: Tuple[str, ...]
    positions: Tuple[int, ...]
    weight: float
    occurrence: int = 1
    # "pieces": the word's map is the mean over its pieces; "sum": one recorded column holding the summed attention
    # of all its positions (the padding entry: up to 500 positions that would otherwise each be kept)
    reduce: str = "pieces"


# scripts written without spaces between words: a listed entry in them is looked for inside the prompt's words
SPACELESS = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]")
SPECIAL_ENTRIES = {"<end>": "end", "</s>": "end", "<padding>": "padding", "<pad>": "padding"}


@dataclass(frozen=True)
class TokenTracking:
    """The words to follow in one prompt; ``positions`` is what the recorder keeps, in this order."""

    prompt: str
    words: Tuple[TrackedWord, ...]
    context_length: int
    prompt_id: str = "prompt_000"
    # the text context this prompt encodes to (what the model's rows must attend to), when the tracker encoded it
    encoded: Optional[Any] = field(default=None, compare=False, repr=False)
    # the negative prompt's tracking, when one tracker tracked both (the uncond rows' words)
    negative: Optional["TokenTracking"] = field(default=None, compare=False, repr=False)

    @property
    def positions(self) -> Tuple[int, ...]:
        """Context positions recorded one column each (the summed entries' come after them, one column each)."""
        return tuple(sorted({p for w in self.words if w.reduce != "sum" for p in w.positions}))

    @property
    def summed(self) -> Tuple[Tuple[int, ...], ...]:
        """Position groups recorded as one column of summed attention each, after ``positions``' columns."""
        return tuple(w.positions for w in self.words if w.reduce == "sum")

    def columns(self, word: TrackedWord) -> List[int]:
        """Indices of ``word``'s pieces along the recorded tokens axis."""
        if word.reduce == "sum":
            sums = [w.label for w in self.words if w.reduce == "sum"]
            return [len(self.positions) + sums.index(word.label)]
        index = {p: i for i, p in enumerate(self.positions)}
        return [index[p] for p in word.positions]

    def word(self, label: str) -> TrackedWord:
        for w in self.words:
            if w.label == label:
                return w
        raise TrackingError(f"no tracked word {label!r}; tracked: {[w.label for w in self.words]}")

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "prompt_id": self.prompt_id, "context_length": self.context_length,
                "words": [asdict(w) for w in self.words]}

    @classmethod
    def from_json(cls, data: dict) -> "TokenTracking":
        words = tuple(TrackedWord(**{**w, "token_ids": tuple(w["token_ids"]), "token_texts": tuple(w["token_texts"]),
                                     "positions": tuple(w["positions"])}) for w in data["words"])
        return cls(data["prompt"], words, data["context_length"], data.get("prompt_id", "prompt_000"))


@dataclass(frozen=True)
class _Word:
    text: str
    positions: Tuple[int, ...]
    ids: Tuple[int, ...]
    pieces: Tuple[str, ...]
    weight: float


def split_words(tokens: Sequence[Tuple], piece: Callable[[int], str]) -> List[_Word]:
    """Words of a tokenized prompt; ``tokens`` are ``(token, weight, word_id)``, ``piece(id)`` a token's text.

    Position 0.. are context positions. Padding, end tokens (word id 0) and embedding vectors are no word.
    """
    words: List[_Word] = []
    cur: Optional[dict] = None

    def close():
        nonlocal cur
        if cur is not None and clean_word("".join(cur["pieces"])):
            words.append(_Word(clean_word("".join(cur["pieces"])), tuple(cur["pos"]), tuple(cur["ids"]),
                               tuple(cur["pieces"]), max(cur["weights"], key=lambda w: abs(w - 1.0))))
        cur = None

    last_segment = None
    for pos, (tok, weight, segment) in enumerate(tokens):
        if segment == 0 or not isinstance(tok, int):
            close()
            last_segment = None
            continue
        text = piece(tok)
        special = len(text) > 2 and text[0] == "<" and text[-1] == ">"  # <unk> and friends: unreadable
        marker_only = cur is not None and "".join(cur["pieces"]) == WORD_START and segment == last_segment
        if special or not clean_word(text) and text != WORD_START:
            close()  # punctuation belongs to no word (a pending lone marker before it is dropped too)
        elif text.startswith(WORD_START) or segment != last_segment or cur is None:
            if not marker_only:  # a lone "▁" piece starts the word that follows it
                close()
        last_segment = segment
        if special or not clean_word(text) and text != WORD_START:
            continue
        if cur is None:
            cur = {"pieces": [], "pos": [], "ids": [], "weights": []}
        cur["pieces"].append(text)
        cur["pos"].append(pos)
        cur["ids"].append(tok)
        cur["weights"].append(float(weight))
    close()
    return words


def track(tokens: Sequence[Tuple], piece: Callable[[int], str], prompt: str, mode: str = "weighted",
          listed: Iterable[str] = (), prompt_id: str = "prompt_000") -> TokenTracking:
    """The tracking spec of one tokenized prompt.

    ``mode``: ``weighted`` follows every word whose weight is not 1.0, ``listed`` the words in ``listed`` (a
    multi-word entry such as ``red flower`` follows the consecutive words as one item), ``both`` the union.
    Every occurrence is followed and labelled (``flower``, ``flower_2``...).
    """
    if mode not in MODES:
        raise TrackingError(f"mode must be one of {MODES}, got {mode!r}")
    words = split_words(tokens, piece)
    entries, specials = _listed_entries(listed, mode)
    chosen: List[Tuple[int, int]] = []  # (first word index, word count)
    inside: List[Tuple[str, Tuple[int, ...]]] = []  # listed text found inside words (scripts without spaces)
    if mode in ("weighted", "both"):
        chosen += [(i, 1) for i, w in enumerate(words) if abs(w.weight - 1.0) > 1e-6]
    if mode in ("listed", "both"):
        for entry in entries:
            hits, found = _find_listed(words, tokens, piece, entry, prompt)
            chosen += hits
            inside += [(entry, f) for f in found]
    out = _labelled(words, chosen, inside, tokens, piece)
    out += [special_entry(tokens, piece, kind) for kind in dict.fromkeys(specials)]
    lost = _warn_unread_weights(tokens, out, prompt) if mode in ("weighted", "both") else 0
    if not out and lost:
        raise TrackingError(f"nothing to track in {prompt!r}: its weighted text ({lost} place(s)) has no word the "
                            "tokenizer can read (emoji or symbols become <unk>); weight a word made of letters or "
                            "digits, like (flower:1.5)")
    if not out:
        hint = ""
        if re.search(r"[（(][^()（）]*[:：]\s*[\d.]+\s*[）)]", prompt) and re.search("[（）：]", prompt):
            hint = (" (full-width brackets or colon such as （红花：1.5） are plain text to ComfyUI: write the weight "
                    "with ASCII ( : ) as (红花:1.5))")
        raise TrackingError(f"nothing to track in {prompt!r}: no word has a weight other than 1.0{hint}; weight a "
                            "word like (flower:1.5) or list words to track")
    return TokenTracking(prompt, tuple(out), len(tokens), prompt_id)


def _listed_entries(listed: Iterable[str], mode: str) -> Tuple[List[str], List[str]]:
    """The listed words (cleaned) and the special entries (``<end>``, ``<padding>``) among them."""
    given = [x for x in listed if x and x.strip()]
    specials = [SPECIAL_ENTRIES[x.strip().lower()] for x in given if x.strip().lower() in SPECIAL_ENTRIES]
    given = [x for x in given if x.strip().lower() not in SPECIAL_ENTRIES]
    unreadable = [x for x in given if not clean_phrase(x)]
    if unreadable and mode in ("listed", "both"):
        one = len(unreadable) == 1
        shown = ", ".join(repr(x[:20]) for x in unreadable[:5])
        raise TrackingError(f"the listed entr{'y' if one else 'ies'} {shown} {'has' if one else 'have'} "
                            "no letters or digits: emoji and punctuation are not words the text encoder keeps; list "
                            "words that appear in the prompt")
    entries = [e for e in (clean_phrase(x) for x in given) if e]
    if mode == "listed" and not entries and not specials:
        raise TrackingError("mode 'listed' needs at least one word in the word list")
    return entries, specials


def _find_listed(words, tokens, piece, entry: str, prompt: str):
    """``(first word, word count)`` of each occurrence of a listed entry, or the positions it covers inside words
    (scripts without spaces); an entry that is nowhere is an error listing the prompt's words."""
    texts = [w.text for w in words]
    parts = entry.split(" ")
    hits = [i for i in range(len(texts) - len(parts) + 1) if texts[i:i + len(parts)] == parts]
    found = substring_hits(tokens, piece, entry) if not hits and SPACELESS.search(entry) else []
    if not hits and not found:
        present = sorted(set(texts))
        raise TrackingError(f"the word {entry!r} is not in the prompt {prompt!r}; its words are: "
                            f"{', '.join(present) if present else '(none)'}")
    return [(i, len(parts)) for i in hits], found


def _labelled(words, chosen, inside, tokens, piece) -> List[TrackedWord]:
    """The tracked words in prompt order, each occurrence labelled (``flower``, ``flower_2``...)."""
    counts: dict = {}
    out = []
    for i, n in sorted(set(chosen)):
        group = words[i:i + n]
        name = " ".join(w.text for w in group)
        counts[name] = counts.get(name, 0) + 1
        label = name.replace(" ", "_") + ("" if counts[name] == 1 else f"_{counts[name]}")
        pieces = [(t, p, pos) for w in group for t, p, pos in zip(w.ids, w.pieces, w.positions)]
        # a bare word-start piece ("\u2581" alone, before "Tree") carries no text: not averaged into the word's map
        pieces = [x for x in pieces if x[1].replace("\u2581", "")] or pieces
        out.append(TrackedWord(
            label=label, word=name, token_ids=tuple(t for t, _, _ in pieces), token_texts=tuple(p for _, p, _ in pieces),
            positions=tuple(pos for _, _, pos in pieces),
            weight=max((w.weight for w in group), key=lambda x: abs(x - 1.0)), occurrence=counts[name]))
    for entry, positions in inside:
        counts[entry] = counts.get(entry, 0) + 1
        out.append(TrackedWord(
            label=entry.replace(" ", "_") + ("" if counts[entry] == 1 else f"_{counts[entry]}"), word=entry,
            token_ids=tuple(tokens[p][0] for p in positions), token_texts=tuple(piece(tokens[p][0]) for p in positions),
            positions=positions, weight=max((float(tokens[p][1]) for p in positions), key=lambda x: abs(x - 1.0)),
            occurrence=counts[entry]))
    return out


def _warn_unread_weights(tokens, out: List[TrackedWord], prompt: str) -> int:
    """Weighted text the tokenizer could not read as any word is said, not dropped; returns how many places."""
    seg_of = {pos: seg for pos, (tok, w, seg) in enumerate(tokens)}
    covered = {seg_of[p] for t in out for p in t.positions}
    lost = sorted({seg for tok, w, seg in tokens if seg and abs(float(w) - 1.0) > 1e-6} - covered)
    if lost:
        warnings.warn(f"weighted text in {len(lost)} place(s) of {prompt[:60]!r} has no word the tokenizer can read "
                      "(emoji or symbols become <unk>): it is not tracked", stacklevel=3)
    return len(lost)


def substring_hits(tokens: Sequence[Tuple], piece: Callable[[int], str], entry: str) -> List[Tuple[int, ...]]:
    """Where ``entry`` occurs inside the prompt's text, for scripts without spaces (Chinese, Japanese): the
    positions of the pieces each occurrence overlaps. Text is compared lowercased, with the word marker as a space."""
    chars: List[int] = []
    text = []
    for pos, (tok, _w, segment) in enumerate(tokens):
        if segment == 0 or not isinstance(tok, int):
            continue
        t = piece(tok)
        if len(t) > 2 and t[0] == "<" and t[-1] == ">":
            continue
        t = t.replace(WORD_START, " ").lower()
        text.append(t)
        chars += [pos] * len(t)
    joined, needle, out, start = "".join(text), entry.lower(), [], 0
    while needle:
        i = joined.find(needle, start)
        if i < 0:
            break
        out.append(tuple(sorted(set(chars[i:i + len(needle)]))))
        start = i + len(needle)
    return out


def special_entry(tokens: Sequence[Tuple], piece: Callable[[int], str], kind: str) -> TrackedWord:
    """The end token (``<end>``) or all padding positions as one summed entry (``<padding>``)."""
    wanted = "</s>" if kind == "end" else "<pad>"
    positions = tuple(p for p, (tok, _w, seg) in enumerate(tokens) if seg == 0 and isinstance(tok, int)
                      and piece(tok) == wanted)
    if kind == "end":
        positions = positions[:1]
    if not positions:
        raise TrackingError(f"the context has no {wanted} token to track as '{kind}'" +
                            (": the prompt fills the whole context" if kind == "padding" else ""))
    return TrackedWord(label=kind, word=wanted, token_ids=tuple(tokens[p][0] for p in positions[:1]),
                       token_texts=(wanted,), positions=positions, weight=1.0,
                       reduce="sum" if kind == "padding" else "pieces")


def clean_phrase(text: str) -> str:
    return " ".join(clean_word(t) for t in text.split() if clean_word(t))
