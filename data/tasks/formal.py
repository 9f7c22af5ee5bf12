"""Formal languages of "Practical Computational Power of Linear Transformers and Their Recurrent
and Self-Referential Extensions" (Irie et al., 2023), trained on short strings, tested on longer.

parity (``parity_target: class``, classification as in Deletang et al.)::

    BOS b_1 ... b_n =        scored at '=': the class '0' or '1' (parity of the bits)

parity (``parity_target: next_symbols``, character prediction as in Bhattamishra et al., the
setting of Irie et al.): strings of bits with an even number of 1s; after every prefix the set of
valid next symbols is {0, 1}, plus end-of-string when the prefix has an even number of 1s.

(aa)*, (abab)*, a^n b^n, a^n b^n c^n, shuffle-2, Dyck-1, reset Dyck-1 (character prediction, as
in Bhattamishra et al., 2020): after every prefix predict the SET of symbols that may follow
(including end-of-string) as a multi-label target; a string is correct when every position's set
is right. Reset Dyck-1 adds a symbol ``r`` that may appear anywhere and resets the depth to 0.
Shuffle-2 interleaves a Dyck-1 word over ``()`` with one over ``[]`` (two independent counters).

Lengths: a string's length is drawn uniformly among the lengths the language has inside
[min_length, max_length] (``valid_lengths``); an explicit ``length`` is moved up to the next such
length. ``length_bins: paper`` replaces the training range and the test bins with
:data:`PAPER_BINS` (the windows of the data sets of Bhattamishra et al., 2020, which Irie et al.,
2023 train and test on; see its comment for what is confirmed); ``small`` with :data:`SMALL_BINS`
(the same shape at CPU size).

Token ids: 0 PAD, 1 BOS, symbols from 2. Labels: one per symbol, then EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

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
    length_bins: str = "custom"  # custom: min/max_length, eval_lengths | paper: PAPER_BINS | small: SMALL_BINS


#: (training range, [bin 0, bin 1]) of string lengths per language, inclusive, for ``length_bins:
#: paper``. Sources (read, not copied): IDSIA/fwp-formal-lang@e0c1ce9 README.md ("Data": Irie et al.
#: use the data sets Bhattamishra et al. released, except reset Dyck-1, which they generated with
#: Bhattamishra's code; "valid" = Bin0, "valid2" = Bin1) and satwik77/Transformer-Formal-Languages
#: @48eea2e generate_data.py (load_data, which cut those sets): bin 0 is drawn from the training
#: window itself and bin 1 is the next window, from the training top U plus an offset to U + len_incr,
#: in the window's unit; strings whose length falls outside a window are rejected, so a range here
#: ends at lengths the language has.
#: Confirmed from that code: the offsets, the units (n for a^n b^n / a^n b^n c^n, string length for
#: the rest) and which lengths each language has. NOT confirmed: the window numbers (lower, U,
#: len_incr): they are set on the command line and kept only in the released data (data_info.json;
#: neither repository holds it, and the papers' tables could not be read here). 2 / 50 / 50 is the
#: README's example call (README.md "Generating Other Datasets", Shuffle-4) and U + 2 = 52 the bin-1
#: default of src/args.py (-bin1_lower_window); 500 / 100 for (aa)* and (abab)* and n >= 1 for the
#: counter languages have no source here (an earlier transcription from memory), so check them
#: against the papers before quoting them.
#: Input convention there: the model reads the bare string (no BOS, src/utils/sentence_processing.py,
#: src/dataloader.py Sampler.get_batch; Irie's copy_task_data.py adds none either) and is scored
#: after each symbol; here BOS comes first, so the empty prefix's set (position 0) is scored too.
PAPER_BINS: Dict[str, Tuple[Tuple[int, int], List[Tuple[int, int]]]] = {
    # every length in the window (src/utils/parity_generator.py generate_list); bin 1 =
    # [U + 1, U + len_incr] (generate_data.py, 'Parity')
    "parity": ((2, 50), [(2, 50), (51, 100)]),
    # even lengths only: a uniform length in the window rounded down to a multiple of 2, rejected if
    # it leaves the window (src/utils/nonstarfree_generator.py AAStarLanguage.generate_string,
    # generate_list); bin 1 = [U + 1, U + len_incr] (generate_data.py, 'AAStar'). Numbers unsourced.
    "aa_star": ((2, 500), [(2, 500), (502, 600)]),
    # multiples of 4, as for (aa)* (ABABStarLanguage.generate_string; generate_data.py, 'ABABStar').
    # Numbers unsourced.
    "abab_star": ((4, 500), [(4, 500), (504, 600)]),
    # the window is n, the string a^n b^n (src/utils/data_generator.py CounterLanguage.generate_sample);
    # bin 1: n in [U + 1, U + len_incr] (generate_data.py, 'Counter'): n in [1, 50] then [51, 100]
    "anbn": ((2, 100), [(2, 100), (102, 200)]),
    "anbncn": ((3, 150), [(3, 150), (153, 300)]),
    # even lengths (src/utils/shuffle_generator.py generate, generate_list); bin 1 = [U + 2,
    # U + len_incr] (generate_data.py, 'Shuffle'); 2 / 50 / 50 is the README's Shuffle-4 call
    "shuffle2": ((2, 50), [(2, 50), (52, 100)]),
    # even lengths (src/utils/dyck_generator.py); bin 1 from -bin1_lower_window/-bin1_upper_window,
    # defaults 52 / 100 (generate_data.py, 'Dyck'; src/args.py)
    "dyck1": ((2, 50), [(2, 50), (52, 100)]),
    # any length; bin 1 = [U + 1, U + len_incr] (generate_data.py, 'RDyck'), so 51, not 52. There the
    # window bounds only the two Dyck-1 pieces around the one reset symbol, so strings run up to
    # 2U + 1 (src/utils/reset_dyck_generator.py generate_reset_dyck, generate_list checks only the
    # lower end); here they stay inside the window and may hold any number of resets.
    "reset_dyck1": ((2, 50), [(2, 50), (51, 100)]),
}

#: CPU-sized bins of the same shape: training lengths up to ~40, test bin 1 up to twice that
SMALL_BINS: Dict[str, Tuple[Tuple[int, int], List[Tuple[int, int]]]] = {
    "parity": ((2, 20), [(2, 20), (21, 40)]),
    "aa_star": ((2, 40), [(2, 40), (42, 80)]),
    "abab_star": ((4, 40), [(4, 40), (44, 80)]),
    "anbn": ((2, 40), [(2, 40), (42, 80)]),
    "anbncn": ((3, 45), [(3, 45), (48, 90)]),
    "shuffle2": ((2, 40), [(2, 40), (42, 80)]),
    "dyck1": ((2, 40), [(2, 40), (42, 80)]),
    "reset_dyck1": ((2, 40), [(2, 40), (41, 80)]),
}
BINS = {"paper": PAPER_BINS, "small": SMALL_BINS}

#: a language's string lengths are the multiples of this (parity and reset Dyck-1: any length >= 1)
LENGTH_MULTIPLE = {
    "parity": 1,
    "aa_star": 2,
    "abab_star": 4,
    "anbn": 2,
    "anbncn": 3,
    "shuffle2": 2,
    "dyck1": 2,
    "reset_dyck1": 1,
}


def valid_lengths(language: str, lo: int, hi: int) -> List[int]:
    """The lengths in [lo, hi] (>= 1) that ``language`` has strings of."""
    m = LENGTH_MULTIPLE[language]
    return [n for n in range(max(lo, 1), hi + 1) if n % m == 0]


def next_valid_length(language: str, n: int) -> int:
    """The smallest length >= n (and >= 1) that ``language`` has strings of."""
    m = LENGTH_MULTIPLE[language]
    n = max(n, 1)
    return n + (-n) % m


def _dyck(rng, n: int, reset: bool, pair: str = "()") -> str:
    """A random string of length n with balanced brackets ``pair`` (n even), or with ``reset``
    a reset Dyck-1 string of any length: an ``r`` (depth := 0) may appear anywhere (probability 0.1
    per step) and is forced when the remaining steps cannot close the brackets."""
    out, depth = [], 0
    for i in range(n):
        remaining = n - i
        if reset and ((remaining - depth) % 2 == 1 or rng.random() < 0.1):
            out.append("r")
            depth = 0
            continue
        if depth >= remaining:
            choice = pair[1]
        elif depth == 0:
            choice = pair[0]
        else:
            choice = pair[0] if rng.random() < 0.5 else pair[1]
        depth += 1 if choice == pair[0] else -1
        out.append(choice)
    return "".join(out)


def _shuffle2(rng, n: int) -> str:
    """A Dyck-1 word over () and one over [] (even lengths adding to n) interleaved at random."""
    n1 = 2 * int(rng.integers(0, n // 2 + 1))
    first, second = _dyck(rng, n1, reset=False), _dyck(rng, n - n1, reset=False, pair="[]")
    order = rng.permutation(np.array([0] * len(first) + [1] * len(second), dtype=np.int64))
    parts, i, j = [], 0, 0
    for o in order:
        if o == 0:
            parts.append(first[i])
            i += 1
        else:
            parts.append(second[j])
            j += 1
    return "".join(parts)


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
        elif language == "shuffle2":
            d1, d2 = p.count("(") - p.count(")"), p.count("[") - p.count("]")
            sets.append(
                {"(", "["}
                | ({")"} if d1 > 0 else set())
                | ({"]"} if d2 > 0 else set())
                | ({"$"} if d1 == d2 == 0 else set())
            )
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
    """A random string of ``language`` of length :func:`next_valid_length` (n)."""
    n = next_valid_length(language, n)
    if language == "parity":  # random bits with an even number of 1s (the last bit fixes it)
        bits = rng.integers(0, 2, size=n)
        bits[-1] = bits[:-1].sum() % 2
        return "".join(str(b) for b in bits)
    if language == "aa_star":
        return "a" * n
    if language == "abab_star":
        return "abab" * (n // 4)
    if language == "anbn":
        return "a" * (n // 2) + "b" * (n // 2)
    if language == "anbncn":
        return "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3)
    if language == "shuffle2":
        return _shuffle2(rng, n)
    if language == "dyck1":
        return _dyck(rng, n, reset=False)
    if language == "reset_dyck1":
        return _dyck(rng, n, reset=True)
    raise ValueError(language)


ALPHABETS: Dict[str, str] = {
    "parity": "01=",
    "aa_star": "a",
    "abab_star": "ab",
    "anbn": "ab",
    "anbncn": "abc",
    "shuffle2": "()[]",
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
        if options.length_bins not in ("custom", "paper", "small"):
            from lm.errors import ConfigError

            raise ConfigError(
                f"data.task.params.length_bins: '{options.length_bins}' is not one of custom, paper, small"
            )
        if options.length_bins in BINS:
            (options.min_length, options.max_length), bins = BINS[options.length_bins][options.language]
            self.bins: List[Tuple[int, int]] = list(bins)
        else:
            self.bins = []
        if not valid_lengths(options.language, options.min_length, options.max_length):
            from lm.errors import ConfigError

            raise ConfigError(
                f"data.task.params.min_length/max_length: no string of '{options.language}' has a length in "
                f"[{options.min_length}, {options.max_length}]"
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
        if length:
            n = length
        elif self.classify:
            n = int(rng.integers(o.min_length, o.max_length + 1))
        else:
            choices = valid_lengths(o.language, o.min_length, o.max_length)
            n = choices[int(rng.integers(0, len(choices)))]
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
        if self.bins:
            return {"length": list(self.bins)}
        return {"length": list(self.options.eval_lengths)}
