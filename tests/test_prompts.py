"""Prompt files are classes: no two lines may be one class, one line is said to be what it is,
and prompts are paired with named classes (the folders of a test set) by name, not line order."""

from __future__ import annotations

import logging

import pytest

from clipdistill.core.errors import ConfigError
from clipdistill.data.prompts import check_prompts, pair_prompts, prompt_key


@pytest.mark.parametrize("lines", [["a circle", "a star", "a circle"], ["a circle.", "a star", "A Circle!"],
                                   ["a  circle", "a star", "a circle"]])
def test_duplicate_prompts_are_refused_naming_both_lines(lines):
    with pytest.raises(ConfigError, match=r"--prompts p\.txt: lines 1 and 3 .*one class"):
        check_prompts(lines, "--prompts", "p.txt")


def test_a_prompt_without_words_is_refused():
    with pytest.raises(ConfigError, match="line 2 .* has no words"):
        check_prompts(["a circle", "?!"], "--prompts", "p.txt")


def test_one_prompt_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="clipdistill"):
        assert check_prompts(["a circle"], "--prompts", "p.txt") == ["a circle"]
    assert "one prompt" in caplog.text and "none of these" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipdistill"):
        check_prompts(["a circle", "a star"], "--prompts", "p.txt")
    assert not caplog.text


def test_prompt_key_ignores_case_spacing_and_punctuation_only():
    assert prompt_key(" A  Circle! ") == prompt_key("a circle.") == "a circle"
    assert prompt_key("a circle") != prompt_key("a circles") and prompt_key("c++") == "c"


def test_prompts_pair_with_folders_by_name_whatever_the_line_order(caplog):
    classes = ["circle", "heart", "red_car", "star"]
    prompts = ["a photo of a star", "two red cars", "a heart", "a circle"]
    with caplog.at_level(logging.INFO, logger="clipdistill"):
        assert pair_prompts(classes, prompts, "p.txt") == ["a circle", "a heart", "two red cars",
                                                            "a photo of a star"]
    assert "paired with the class folders by name" in caplog.text and "red_car -> 'two red cars'" in caplog.text


def test_a_last_unnamed_prompt_takes_the_last_unnamed_folder():
    assert pair_prompts(["circle", "other", "star"], ["a star", "something else", "a circle"], "p.txt") == \
        ["a circle", "something else", "a star"]


def test_an_ambiguous_pairing_is_refused_with_its_table():
    with pytest.raises(ConfigError) as e:
        pair_prompts(["circle", "star"], ["a circle and a star", "a star and a circle"], "p.txt")
    msg = str(e.value)
    assert "cannot pair the prompts with the class folders by name" in msg
    assert "circle -> named by 'a circle and a star' / 'a star and a circle'" in msg


def test_prompts_that_name_no_folder_keep_line_order_and_say_so(caplog):
    with caplog.at_level(logging.INFO, logger="clipdistill"):
        assert pair_prompts(["a", "b"], ["first thing", "second thing"], "p.txt") == ["first thing", "second thing"]
    assert "paired by line order" in caplog.text
    with pytest.raises(ConfigError, match="3 prompts for 2 classes"):
        pair_prompts(["a", "b"], ["x", "y", "z"], "p.txt")
