"""The eight formal languages of Irie et al. (2023) (issue #21): every generated string belongs to its
language by an independent recogniser, the requested lengths are all produced, end-of-string is a
valid next symbol exactly where the prefix is in the language, and the paper's length bins load."""

import re

import numpy as np
import pytest

from data.tasks.formal import ALPHABETS, BINS, PAPER_BINS, FormalLanguage, FormalOptions, valid_lengths
from lm.errors import ConfigError

LANGUAGES = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2", "dyck1", "reset_dyck1"]


def _balanced(s: str, open_: str, close: str, reset: str = "") -> bool:
    depth = 0
    for ch in s:
        if ch == reset:
            depth = 0
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def in_language(language: str, s: str) -> bool:
    """Membership, written apart from the generators (regular expressions and counters)."""
    if language == "parity":
        return re.fullmatch(r"[01]*", s) is not None and s.count("1") % 2 == 0
    if language == "aa_star":
        return re.fullmatch(r"(aa)*", s) is not None
    if language == "abab_star":
        return re.fullmatch(r"(abab)*", s) is not None
    if language == "anbn":
        n = len(s) // 2
        return n >= 1 and s == "a" * n + "b" * n  # n >= 1, as in the paper
    if language == "anbncn":
        n = len(s) // 3
        return n >= 1 and s == "a" * n + "b" * n + "c" * n
    if language == "shuffle2":
        return (
            set(s) <= set("()[]")
            and _balanced(s.replace("[", "").replace("]", ""), "(", ")")
            and _balanced(s.replace("(", "").replace(")", ""), "[", "]")
        )
    if language == "dyck1":
        return set(s) <= set("()") and _balanced(s, "(", ")")
    if language == "reset_dyck1":
        return set(s) <= set("()r") and _balanced(s, "(", ")", reset="r")
    raise ValueError(language)


def decode(task, inputs):
    symbols = {v: k for k, v in task.token.items()}
    return "".join(symbols[int(t)] for t in inputs[1:])


def task_for(language, **params):
    extra = {"parity_target": "next_symbols"} if language == "parity" else {}
    return FormalLanguage(FormalOptions(language=language, **extra, **params))


def test_every_language_of_the_paper_is_there():
    assert set(LANGUAGES) == set(ALPHABETS) == set(PAPER_BINS)


@pytest.mark.parametrize("language", LANGUAGES)
def test_generated_strings_are_in_the_language_and_cover_the_lengths(language):
    lo, hi = 2, 24
    task = task_for(language, min_length=lo, max_length=hi)
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(600):
        ex = task.example(rng)
        s = decode(task, ex["inputs"])
        assert in_language(language, s), (language, s)
        assert lo <= len(s) <= hi
        lengths.add(len(s))
        # end-of-string is allowed after exactly the prefixes that are in the language
        end = task.labels.index("$")
        for i in range(len(s) + 1):
            assert bool(ex["targets"][i, end]) == in_language(language, s[:i]), (language, s, i)
            if i < len(s):  # the symbol that does follow is always allowed
                assert ex["targets"][i, task.labels.index(s[i])] == 1.0
    want = {
        n
        for n in range(lo, hi + 1)
        if any(len(w) == n and in_language(language, w) for w in _words_of_length(language, n))
    }
    assert set(valid_lengths(language, lo, hi)) == want
    assert lengths == want, (language, sorted(want - lengths))


def _words_of_length(language, n):
    """A few hand-made members of each length (to know which lengths a language has)."""
    if language == "parity":
        return ["0" * n]
    if language == "aa_star":
        return ["a" * n]
    if language == "abab_star":
        return ["ab" * (n // 2)]
    if language == "anbn":
        return ["a" * (n // 2) + "b" * (n // 2)]
    if language == "anbncn":
        return ["a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3)]
    if language == "shuffle2":
        return ["()" * (n // 2)] if n % 2 == 0 else []
    if language == "dyck1":
        return ["()" * (n // 2)] if n % 2 == 0 else []
    return ["()" * (n // 2) + "r" * (n % 2)]


@pytest.mark.parametrize("kind", ["paper", "small"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_explicit_lengths_and_bins(language, kind):
    task = task_for(language, length_bins=kind)
    (lo, hi), bins = BINS[kind][language]
    assert (task.options.min_length, task.options.max_length) == (lo, hi)
    assert task.eval_settings() == {"length": bins}
    rng = np.random.default_rng(1)
    for b_lo, b_hi in bins:
        for n in (b_lo, b_hi, (b_lo + b_hi) // 2):
            s = decode(task, task.example(rng, length=n)["inputs"])
            assert in_language(language, s) and b_lo <= len(s) <= b_hi, (language, n, len(s))
        assert valid_lengths(language, b_lo, b_hi)[0] == b_lo and valid_lengths(language, b_lo, b_hi)[-1] == b_hi


def test_bad_length_options_are_config_errors():
    with pytest.raises(ConfigError, match="length_bins"):
        task_for("dyck1", length_bins="papers")
    with pytest.raises(ConfigError, match="min_length/max_length"):
        task_for("abab_star", min_length=5, max_length=7)
