"""Formal languages of "Practical Computational Power of Linear Transformers and Their Recurrent
and Self-Referential Extensions" (Irie et al., 2023), trained on short strings, tested on longer.

parity (``parity_target: class``, classification as in Deletang et al.)::

    BOS b_1 ... b_n =        scored at '=': the class '0' or '1' (parity of the bits)

parity (``parity_target: next_symbols``, character prediction as in Bhattamishra et al., the
setting of Irie et al.): strings of bits with an even number of 1s; after every prefix the set of
valid next symbols is {0, 1}, plus end-of-string when the prefix has an even number of 1s.

(aa)*, (abab)*, a^n b^n, a^n b^n c^n, Dyck-1, reset Dyck-1 (character prediction, as in
Bhattamishra et al., 2020): after every prefix predict the SET of symbols that may follow
(including end-of-string) as a multi-label target; a string is correct when every position's set
is right. Reset Dyck-1 adds a symbol ``r`` that may appear anywhere and resets the depth to 0.

Token ids: 0 PAD, 1 BOS, symbols from 2. Labels: one per symbol, then EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from data.tasks.base import Example, Task, TaskSpec

PAD, BOS = 0, 1


@dataclass
class FormalOptions:
    language: str = "parity"
    min_length: int = 2
    max_length: int = 40
    eval_lengths: List[int] = field(default_factory=lambda: [20, 40, 80, 160])
    parity_target: str = "class"  # parity only: class | next_symbols (see the module docstring)


def _round(n: int, multiple: int) -> int:
    return max(multiple, multiple * round(n / multiple))


def _dyck(rng, n: int, reset: bool) -> str:
    out, depth = [], 0
    for i in range(n):
        remaining = n - i
        if reset and rng.random() < 0.1 and remaining >= 1 and (depth == 0 or remaining > 1):
            out.append("r")
            depth = 0
            continue
        if depth >= remaining:
            choice = ")"
        elif depth == 0:
            choice = "("
        else:
            choice = "(" if rng.random() < 0.5 else ")"
        depth += 1 if choice == "(" else -1
        out.append(choice)
    return "".join(out)


def _next_sets(language: str, s: str) -> List[set]:
    """The valid next symbols ('$' = end) after each prefix s[:i], i = 0..len(s)."""
    sets = []
    n = len(s)
    for i in range(n + 1):
        p = s[:i]
        if language == "aa_star":
            sets.append({"a"} if i % 2 else {"a", "$"})
        elif language == "abab_star":
            sets.append([{"a", "$"}, {"b"}, {"a"}, {"b"}][i % 4])
        elif language in ("anbn", "anbncn"):
            a, b, c = p.count("a"), p.count("b"), p.count("c")
            if i == 0:
                sets.append({"a"})
            elif b == 0 and c == 0:
                sets.append({"a", "b"})
            elif b < a:
                sets.append({"b"})
            elif language == "anbn":
                sets.append({"$"})
            elif c < a:
                sets.append({"c"})
            else:
                sets.append({"$"})
        elif language == "parity":
            sets.append({"0", "1"} | ({"$"} if p.count("1") % 2 == 0 else set()))
        elif language in ("dyck1", "reset_dyck1"):
            depth = 0
            for ch in p:
                depth = 0 if ch == "r" else depth + (1 if ch == "(" else -1)
            extra = {"r"} if language == "reset_dyck1" else set()
            sets.append(({"(", ")"} if depth > 0 else {"(", "$"}) | extra)
        else:
            raise ValueError(language)
    return sets


def _string(language: str, rng, n: int) -> str:
    if language == "parity":  # random bits with an even number of 1s (the last bit fixes it)
        bits = rng.integers(0, 2, size=n)
        bits[-1] = bits[:-1].sum() % 2
        return "".join(str(b) for b in bits)
    if language == "aa_star":
        return "a" * _round(n, 2)
    if language == "abab_star":
        return "abab" * (_round(n, 4) // 4)
    if language == "anbn":
        k = _round(n, 2) // 2
        return "a" * k + "b" * k
    if language == "anbncn":
        k = _round(n, 3) // 3
        return "a" * k + "b" * k + "c" * k
    if language == "dyck1":
        return _dyck(rng, _round(n, 2), reset=False)
    if language == "reset_dyck1":
        return _dyck(rng, _round(n, 2), reset=True)
    raise ValueError(language)


ALPHABETS: Dict[str, str] = {
    "parity": "01=",
    "aa_star": "a",
    "abab_star": "ab",
    "anbn": "ab",
    "anbncn": "abc",
    "dyck1": "()",
    "reset_dyck1": "()r",
}


class FormalLanguage(Task):
    name = "formal"
    Options = FormalOptions

    def __init__(self, options):
        super().__init__(options)
        if options.language not in ALPHABETS:
            from lm.errors import ConfigError

            raise ConfigError(
                f"data.task.params.language: unknown language '{options.language}'; known: {', '.join(ALPHABETS)}"
            )
        if options.parity_target not in ("class", "next_symbols"):
            from lm.errors import ConfigError

            raise ConfigError(
                f"data.task.params.parity_target: '{options.parity_target}' is not one of class, next_symbols"
            )
        self.alphabet = ALPHABETS[options.language]
        self.token = {ch: 2 + i for i, ch in enumerate(self.alphabet)}
        self.classify = options.language == "parity" and options.parity_target == "class"
        #: multi-label targets: one label per symbol that can appear, then end-of-string
        self.labels = (["0", "1"] if options.language == "parity" else list(self.alphabet)) + ["$"]

    @property
    def spec(self) -> TaskSpec:
        vocab = 2 + len(self.alphabet)
        if self.classify:
            return TaskSpec(vocab_size=vocab, output="classes", pad_id=PAD)
        return TaskSpec(vocab_size=vocab, output="multilabel", output_dim=len(self.labels), pad_id=PAD)

    def example(self, rng: np.random.Generator, length: int = 0) -> Example:
        o = self.options
        n = length or int(rng.integers(o.min_length, o.max_length + 1))
        if self.classify:
            bits = rng.integers(0, 2, size=n)
            inputs = np.array([BOS] + [self.token[str(b)] for b in bits] + [self.token["="]], dtype=np.int64)
            targets = np.zeros(len(inputs), dtype=np.int64)
            targets[-1] = self.token[str(int(bits.sum()) % 2)]
            mask = np.zeros(len(inputs), dtype=bool)
            mask[-1] = True
            return {"inputs": inputs, "targets": targets, "mask": mask}
        s = _string(o.language, rng, n)
        inputs = np.array([BOS] + [self.token[ch] for ch in s], dtype=np.int64)
        targets = np.array(
            [[ch in allowed for ch in self.labels] for allowed in _next_sets(o.language, s)], dtype=np.float32
        )
        return {"inputs": inputs, "targets": targets, "mask": np.ones(len(inputs), dtype=bool)}

    def eval_settings(self):
        return {"length": list(self.options.eval_lengths)}
