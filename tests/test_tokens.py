"""Word tracking from (token, weight, word_id) lists, with a hand-made piece table."""
import pytest

from wan_capture.prompts.tokens import TokenTracking, TrackingError, split_words, track

PIECES = {10: "\u2581a", 11: "\u2581beautiful", 12: "\u2581flow", 13: "er", 14: "\u2581near", 15: "\u2581tree",
          16: ",", 17: "\u2581", 18: "Tree", 19: "<unk>", 1: "</s>", 0: "<pad>"}


def toks(*items):
    return [(t, w, s) for t, w, s in items] + [(1, 1.0, 0), (0, 1.0, 0), (0, 1.0, 0)]


def piece(i):
    return PIECES[i]


def test_words_from_pieces_segments_and_punctuation():
    t = toks((10, 1.0, 1), (11, 1.0, 1), (12, 2.5, 2), (13, 2.5, 2), (16, 1.0, 3), (14, 1.0, 3), (17, 1.0, 3),
             (18, 1.0, 3), (19, 1.0, 3))
    words = split_words(t, piece)
    assert [(w.text, w.positions, w.weight) for w in words] == [
        ("a", (0,), 1.0), ("beautiful", (1,), 1.0), ("flower", (2, 3), 2.5), ("near", (5,), 1.0), ("tree", (6, 7), 1.0)]


def test_weighted_listed_both_and_labels():
    t = toks((12, 1.0, 1), (13, 1.0, 1), (15, 1.5, 2), (14, 1.0, 3), (12, 1.0, 3), (13, 1.0, 3))
    weighted = track(t, piece, "p", "weighted")
    assert [(w.label, w.positions, w.weight) for w in weighted.words] == [("tree", (2,), 1.5)]
    listed = track(t, piece, "p", "listed", ["Flower"])
    assert [(w.label, w.positions, w.occurrence) for w in listed.words] == [("flower", (0, 1), 1), ("flower_2", (4, 5), 2)]
    assert listed.words[0].token_ids == (12, 13) and listed.words[0].token_texts == ("\u2581flow", "er")
    both = track(t, piece, "p", "both", ["near flower"])
    assert [(w.label, w.positions) for w in both.words] == [("tree", (2,)), ("near_flower", (3, 4, 5))]


def test_multiword_entry_and_missing_word_lists_present_words():
    t = toks((14, 1.0, 1), (15, 1.0, 1), (10, 1.0, 1))
    spec = track(t, piece, "near tree a", "listed", ["near tree"])
    assert [(w.label, w.positions) for w in spec.words] == [("near_tree", (0, 1))]
    with pytest.raises(TrackingError, match=r"'rose' is not in the prompt .* its words are: a, near, tree"):
        track(t, piece, "near tree a", "listed", ["rose"])
    with pytest.raises(TrackingError, match="no word has a weight"):
        track(t, piece, "near tree a", "weighted")


def test_json_round_trip_and_columns():
    t = toks((12, 2.0, 1), (13, 2.0, 1), (14, 1.0, 2), (15, 3.0, 3))
    spec = track(t, piece, "p", "weighted", prompt_id="prompt_004")
    back = TokenTracking.from_json(spec.to_json())
    assert back == spec and back.positions == (0, 1, 3)
    assert spec.columns(spec.word("tree")) == [2] and spec.columns(spec.word("flower")) == [0, 1]


def test_listed_emoji_says_what_is_wrong_and_unreadable_weighted_text_warns():
    t = toks((12, 1.0, 1), (13, 1.0, 1), (19, 1.8, 2), (15, 1.5, 3))  # "(🌸:1.8)" tokenizes to <unk>
    with pytest.raises(TrackingError, match=r"'\U0001F338' has no letters or digits: emoji and punctuation"):
        track(t, piece, "p", "listed", ["\U0001F338"])
    with pytest.warns(UserWarning, match="weighted text in 1 place.*not tracked"):
        spec = track(t, piece, "flower (\U0001F338:1.8) (tree:1.5)", "weighted")
    assert [w.label for w in spec.words] == ["tree"]


def test_graph_small_items_bare_word_start_piece_and_emoji_only_weights():
    t = toks((10, 1.0, 1), (17, 1.6, 2), (18, 1.6, 2))  # "a (Tree:1.6)" as "\u2581" + "Tree"
    spec = track(t, piece, "a (Tree:1.6)", "weighted")
    (word,) = spec.words
    assert word.token_texts == ("Tree",) and word.positions == (2,)  # the bare marker is not averaged in
    t = toks((10, 1.0, 1), (19, 1.5, 2))  # "a (🌹:1.5)": its only weighted text is <unk>
    with pytest.raises(TrackingError, match=r"weighted text \(1 place\(s\)\) has no word the tokenizer can read"):
        with pytest.warns(UserWarning):
            track(t, piece, "a (\U0001F339:1.5)", "weighted")
