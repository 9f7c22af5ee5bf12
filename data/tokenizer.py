"""Byte-level BPE tokenizers: train one, load one, name its special tokens, hash it.

A trained tokenizer splits text with the GPT-2 byte-level pre-tokenizer (every byte is a base
symbol, so any text encodes without an unknown token) and learns ``vocab_size - 256 - #special``
merges. The special tokens (end-of-document, padding) come first and get ids 0, 1.
A tokenizer is identified by the sha256 of its ``tokenizer.json`` text.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.split import TOKENIZER_SAMPLE_SALT, unit_hash
from lm.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
#: the byte alphabet every byte-level BPE starts from
N_BYTES = 256
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def new_byte_level_bpe() -> Tokenizer:
    """An empty byte-level BPE (no merges yet): GPT-2 pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    special_tokens: List[str],
    show_progress: bool = False,
    length: Optional[int] = None,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the special tokens get ids ``0 .. len-1``."""
    floor = N_BYTES + len(special_tokens)
    if vocab_size < floor:
        raise DataError(
            f"tokenizer.vocab_size: must be at least {floor} (256 bytes + {len(special_tokens)} "
            f"special tokens), got {vocab_size}"
        )
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file (or a directory that holds one)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise DataError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None


def resolve_tokenizer(spec: str) -> Tuple[Tokenizer, str]:
    """Load ``tokenizer.path``: a local file/directory, else a HF hub tokenizer name.

    Returns the tokenizer and a description of where it came from.
    """
    p = Path(spec).expanduser()
    if p.exists() or spec.endswith(".json"):
        return load_tokenizer(p), str(p)
    try:
        return Tokenizer.from_pretrained(spec), f"hf:{spec}"
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise DataError(
            f"tokenizer.path: '{spec}' is neither a local tokenizer.json nor a loadable HF tokenizer "
            f"({type(e).__name__}: {msg[0] if msg else ''})"
        ) from None


def ensure_special_tokens(tok: Tokenizer, tokens: List[str]) -> Tuple[List[int], List[str]]:
    """Ids of ``tokens`` in ``tok``, adding the missing ones as special tokens.

    Returns ``(ids, added)``; ``added`` lists the tokens that were not in the vocabulary.
    """
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    ids = []
    for t in tokens:
        i = tok.token_to_id(t)
        assert i is not None  # in the vocabulary: added above if it was missing
        ids.append(int(i))
    return ids, missing


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(path_or_hash: Union[str, Path]) -> str:
    """The sha256 of a ``tokenizer.json`` file's content; a 64-hex-digit string passes through."""
    s = str(path_or_hash)
    if _SHA256.match(s) and not Path(s).exists():
        return s
    p = Path(s)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p} (expected a tokenizer.json path or a sha256)")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when the vocabulary has fewer than 65536 ids, else ``uint32``."""
    return "uint16" if vocab_size < 65536 else "uint32"


class TrainingSample:
    """The tokenizer's training text: a seeded uniform subset of documents within ``max_bytes``.

    Priority sampling: document ``i`` gets the key ``unit_hash(seed, TOKENIZER_SAMPLE_SALT, i)``;
    the sample is the documents with the smallest keys whose total size fits ``max_bytes``. It is
    built while streaming (memory stays within ``max_bytes``) and is the same for the same corpus.
    """

    def __init__(self, max_bytes: int, seed: int):
        if max_bytes <= 0:
            raise DataError(f"tokenizer.train_max_bytes: must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._key = lambda i: unit_hash(seed, TOKENIZER_SAMPLE_SALT, i)
        self._heap: list = []  # (-key, index, text, nbytes): the largest key on top
        self.bytes = 0
        self._first: Optional[Tuple[int, str]] = None

    def offer(self, index: int, text: str, nbytes: int) -> None:
        if self._first is None:
            self._first = (index, text)
        heapq.heappush(self._heap, (-self._key(index), index, text, nbytes))
        self.bytes += nbytes
        while self.bytes > self.max_bytes and self._heap:
            _, _, _, size = heapq.heappop(self._heap)
            self.bytes -= size

    def texts(self, keep=lambda index: True) -> List[str]:
        """The sampled documents in source order (``keep`` filters by index)."""
        chosen = sorted((i, t) for _, i, t, _ in self._heap if keep(i))
        if not chosen and self._first is not None and keep(self._first[0]):
            # every document alone exceeds max_bytes: train on the start of the first one
            return [self._first[1].encode("utf-8")[: self.max_bytes].decode("utf-8", "ignore")]
        return [t for _, t in chosen]
