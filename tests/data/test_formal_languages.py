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


def _member_lengths(language, lo, hi):
    """The lengths in [lo, hi] that have a member, by the hand-made members and the recogniser."""
    return [
        n
        for n in range(lo, hi + 1)
        if any(len(w) == n and in_language(language, w) for w in _words_of_length(language, n))
    ]


#: How Bhattamishra et al.'s generate_data.py (satwik77/Transformer-Formal-Languages) cut the data sets
#: Irie et al. use, per language: (symbols per window unit, lower, upper U, len_incr, bin-1 offset);
#: bin 0 = the training window, bin 1 = [U + offset, U + len_incr]; the unit is n for a^n b^n and
#: a^n b^n c^n (2 or 3 symbols each), the string length for the rest. The offsets and units are that
#: code's; the window numbers are not confirmed (see the comment of formal.PAPER_BINS).
SOURCE_WINDOWS = {
    "parity": (1, 2, 50, 50, 1),
    "aa_star": (1, 2, 500, 100, 1),
    "abab_star": (1, 2, 500, 100, 1),
    "anbn": (2, 1, 50, 50, 1),
    "anbncn": (3, 1, 50, 50, 1),
    "shuffle2": (1, 2, 50, 50, 2),
    "dyck1": (1, 2, 50, 50, 2),  # -bin1_lower_window 52
    "reset_dyck1": (1, 2, 50, 50, 1),
}


def _source_bins(language):
    """(training range, [bin 0, bin 1]) in string lengths: each window in symbols, narrowed to the
    lengths that have members (the generators there reject strings outside the window)."""
    unit, lower, upper, incr, offset = SOURCE_WINDOWS[language]

    def window(lo, hi):
        lengths = _member_lengths(language, unit * lo, unit * hi)
        return (lengths[0], lengths[-1])

    train = window(lower, upper)
    return train, [train, window(upper + offset, upper + incr)]


@pytest.mark.parametrize("language", LANGUAGES)
def test_paper_bins_are_the_source_windows(language):
    assert PAPER_BINS[language] == _source_bins(language)


@pytest.mark.parametrize("kind", ["paper", "small"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_generators_cover_every_bin(language, kind):
    """Each bin's lengths are exactly the lengths the language has there; a few of them (both ends
    and random ones) come out of the generator at exactly that length, in the language; training
    draws stay inside the training range."""
    task = task_for(language, length_bins=kind)
    (lo, hi), bins = BINS[kind][language]
    assert (task.options.min_length, task.options.max_length) == (lo, hi)
    assert task.eval_settings() == {"length": bins}
    rng = np.random.default_rng(1)
    for b_lo, b_hi in [(lo, hi)] + list(bins):
        members = _member_lengths(language, b_lo, b_hi)
        assert valid_lengths(language, b_lo, b_hi) == members, (language, b_lo, b_hi)
        assert (members[0], members[-1]) == (b_lo, b_hi)  # a bin ends at lengths the language has
        for n in sorted({b_lo, b_hi, *(int(x) for x in rng.choice(members, size=3))}):
            s = decode(task, task.example(rng, length=n)["inputs"])
            assert len(s) == n and in_language(language, s), (language, n, s)
    for _ in range(5):
        s = decode(task, task.example(rng)["inputs"])
        assert lo <= len(s) <= hi and in_language(language, s), (language, s)


def test_bad_length_options_are_config_errors():
    with pytest.raises(ConfigError, match="length_bins"):
        task_for("dyck1", length_bins="papers")
    with pytest.raises(ConfigError, match="min_length/max_length"):
        task_for("abab_star", min_length=5, max_length=7)
