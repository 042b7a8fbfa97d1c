import pytest

from wan_capture.prompts.templates import TemplateError, expand_template


def prompts(t):
    return [v.prompt for v in expand_template(t)]


def test_seed_example():
    vs = expand_template("a beautiful [(flower:2.5) near a tree|(tree:3) next to a flower]")
    assert [(v.prompt_id, v.prompt) for v in vs] == [
        ("prompt_000", "a beautiful (flower:2.5) near a tree"), ("prompt_001", "a beautiful (tree:3) next to a flower")]


def test_several_groups_cartesian_first_slowest():
    assert prompts("a [red|blue] [car|bus|van]") == ["a red car", "a red bus", "a red van",
                                                    "a blue car", "a blue bus", "a blue van"]


def test_nested_groups():
    assert prompts("[a [b|c] d|e]!") == ["a b d!", "a c d!", "e!"]
    assert prompts("x [[1|2]|[3|4]]") == ["x 1", "x 2", "x 3", "x 4"]


def test_plain_escapes_and_empty_options():
    assert prompts("no groups | here") == ["no groups | here"]
    assert prompts(r"keep \[this\] [a|]") == ["keep [this] a", "keep [this] "]
    assert prompts(r"[x\|y|z]") == ["x|y", "z"]


@pytest.mark.parametrize("bad,msg", [("a [b|c", "unclosed"), ("a b]|c", "unbalanced ']' at position 3"),
                                     ("[[a|b]", "unclosed")])
def test_unbalanced(bad, msg):
    with pytest.raises(TemplateError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        expand_template(bad)
