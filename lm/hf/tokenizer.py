"""The run's ``tokenizers`` tokenizer as a transformers ``PreTrainedTokenizerFast``.

Special tokens come from the run's data config (``data.tokenizer.eod_token``, ``pad_token``):
the end-of-document token is bos and eos (every training document follows one), the padding
token is pad. A post-processor prepends the end-of-document token when ``add_special_tokens``
is on (transformers' default), so ``tokenizer(prompt)`` gives the ids ``lm generate`` reads:
``[eod] + encode(prompt)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from lm.errors import LMError

DEFAULT_EOD, DEFAULT_PAD = "<|endoftext|>", "<|pad|>"


def special_tokens(config: Dict[str, Any], tokenizer_path: Path) -> Dict[str, Any]:
    """{eod, eod_id, pad, pad_id} of the run's tokenizer (one-line error when eod is missing;
    pad falls back to eod)."""
    from tokenizers import Tokenizer

    tok_cfg = (config.get("data") or {}).get("tokenizer") or {}
    eod, pad = tok_cfg.get("eod_token") or DEFAULT_EOD, tok_cfg.get("pad_token") or DEFAULT_PAD
    tok = Tokenizer.from_file(str(tokenizer_path))
    eod_id = tok.token_to_id(eod)
    if eod_id is None:
        raise LMError(f"{tokenizer_path}: no end-of-document token {eod!r} (data.tokenizer.eod_token)")
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        pad, pad_id = eod, eod_id
    return {"eod": eod, "eod_id": int(eod_id), "pad": pad, "pad_id": int(pad_id)}


def hf_tokenizer(tokenizer_path: Path, tokens: Dict[str, Any]):
    """A ``PreTrainedTokenizerFast`` that prepends the end-of-document token."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_path))
    eod, eod_id = tokens["eod"], tokens["eod_id"]
    tok.post_processor = TemplateProcessing(
        single=f"{eod} $A", pair=f"{eod} $A {eod} $B", special_tokens=[(eod, eod_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eod, eos_token=eod, pad_token=tokens["pad"], clean_up_tokenization_spaces=False
    )


def require_transformers() -> None:
    """One-line error when the optional extra 'hf' is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise LMError("transformers is not installed: pip install -e '.[hf]'") from None
