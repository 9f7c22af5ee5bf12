"""Deterministic train / validation / test assignment by document.

Document ``i`` draws ``u_i = unit_hash(split_seed, SPLIT_SALT, i)`` in [0, 1) and goes to

    validation  if u_i < validation_fraction
    test        if validation_fraction <= u_i < validation_fraction + test_fraction
    train       otherwise

so the assignment depends only on the seed and the document's position in the source (not on the
other documents, the tokenizer or the machine). A requested split that comes out empty on a tiny
corpus takes the training document with the smallest ``u`` instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lm.errors import DataError

SPLITS = ("train", "validation", "test")
TRAIN, VALIDATION, TEST = 0, 1, 2
#: salts that make independent hash streams from one seed
SPLIT_SALT = 1
TOKENIZER_SAMPLE_SALT = 2

_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a bijective 64-bit mix (Steele, Lea, Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def unit_hash(seed: int, salt: int, index: int) -> float:
    """A uniform number in [0, 1) determined by ``(seed, salt, index)``."""
    key = splitmix64(splitmix64(splitmix64(seed & _MASK) ^ salt) ^ (index & _MASK))
    return (key >> 11) * (1.0 / (1 << 53))


def label_of(u: float, validation_fraction: float, test_fraction: float) -> int:
    """The split of a document whose hash is ``u`` (see the module docstring)."""
    if u < validation_fraction:
        return VALIDATION
    if u < validation_fraction + test_fraction:
        return TEST
    return TRAIN


def assign_splits(keys: Sequence[float], validation_fraction: float, test_fraction: float) -> np.ndarray:
    """Split labels (uint8, one per document) from the documents' hashes ``keys``.

    Raises a one-line DataError when the corpus has too few documents to give every requested
    split (train always, validation/test when their fraction is > 0) at least one document.
    """
    u = np.asarray(keys, dtype=np.float64)  # the hashes
    n = len(u)
    labels = np.full(n, TRAIN, dtype=np.uint8)
    labels[u < validation_fraction + test_fraction] = TEST
    labels[u < validation_fraction] = VALIDATION
    wanted = [s for s, f in zip(SPLITS, (1.0, validation_fraction, test_fraction)) if f > 0]
    if n < len(wanted):
        raise DataError(
            f"corpus has {n} document(s): too few to split by document into {', '.join(wanted)} "
            f"(use source.split_by=blank_line, more data, or set validation_fraction/test_fraction to 0)"
        )
    if not (labels == TRAIN).any():  # every document hashed into validation/test
        labels[np.argmax(u)] = TRAIN
    for label, fraction in ((VALIDATION, validation_fraction), (TEST, test_fraction)):
        if fraction > 0 and not (labels == label).any():
            # take a document from the largest other split, never emptying it
            donors = [s for s in (TRAIN, VALIDATION, TEST) if s != label]
            donor = max(donors, key=lambda s: int((labels == s).sum()))
            pool = np.flatnonzero(labels == donor)
            labels[pool[np.argmin(u[pool])]] = label
    return labels


#: below either size a validation split is too small for perplexities to be compared reliably
#: (docs/own-corpus.md): fewer documents make the average depend on which few were drawn, fewer
#: tokens give a standard error of the mean loss above ~1%
MIN_VALIDATION_DOCUMENTS = 100
MIN_VALIDATION_TOKENS = 100_000


def small_split_warning(metadata: dict, split: str = "validation") -> "str | None":
    """A one-line warning when ``split`` of a prepared corpus (its ``metadata.json``) is below
    :data:`MIN_VALIDATION_DOCUMENTS` documents or :data:`MIN_VALIDATION_TOKENS` tokens; else None."""
    entry = metadata.get("splits", {}).get(split)
    if not entry:
        return None
    docs, tokens = int(entry.get("documents", 0)), int(entry.get("tokens", 0))
    short = []
    if docs < MIN_VALIDATION_DOCUMENTS:
        short.append(f"{docs} documents (< {MIN_VALIDATION_DOCUMENTS})")
    if tokens < MIN_VALIDATION_TOKENS:
        short.append(f"{tokens:,} tokens (< {MIN_VALIDATION_TOKENS:,})")
    if not short:
        return None
    return (
        f"warning: the {split} split has only {' and '.join(short)}: its perplexity is a noisy estimate; raise "
        f"data.validation_fraction, split the text into more documents (data.source.split_by), or score a "
        f"held-out file with lm eval ppl --data"
    )
