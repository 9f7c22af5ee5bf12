"""``lm data inspect <dir>``: what a prepared directory (or a pretokenized corpus) holds, and a decoded sample."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

from lm.errors import DataError

from data.pretokenized import describe_pretokenized, megatron_prefix
from data.shards import METADATA_FILE, TokenShards, read_metadata
from data.tokenizer import load_tokenizer


def _megatron(d: Path) -> bool:
    prefix = megatron_prefix(d)
    return prefix.with_name(prefix.name + ".idx").is_file()


def _saved_dataset(d: Path) -> bool:
    from data.pretokenized import _is_saved_dataset

    return _is_saved_dataset(d)


def describe(
    data_dir: Union[str, Path], sample_tokens: int = 200, split: Optional[str] = None, tokenizer: Optional[str] = None
) -> str:
    """A text report: counts per split, bytes/token, dtype, tokenizer hash, a decoded sample.

    A Megatron ``.bin``/``.idx`` prefix or an HF dataset of token ids (not yet prepared) gets
    :func:`data.pretokenized.describe_pretokenized` instead (ids decoded with ``tokenizer``).

    The sample is the first ``sample_tokens`` tokens of ``split`` (default: validation if it has
    tokens, else train), decoded with the directory's tokenizer (special tokens shown).
    """
    d = Path(data_dir)
    if not (d / METADATA_FILE).is_file() and (_megatron(d) or d.is_file() or _saved_dataset(d)):
        # a pretokenized corpus (Megatron .bin/.idx or an HF dataset of ids), before any prepare
        return describe_pretokenized(d, tokenizer, sample_tokens)
    meta = read_metadata(d)
    tok = meta["tokenizer"]
    src = meta.get("source", {})
    lines: List[str] = [
        f"data dir:   {d}",
        f"created:    {meta.get('created', '?')} (lm {meta.get('version', '?')})",
        f"source:     {src.get('kind', '?')}, {src.get('files_read', 0)} of {src.get('files', 0)} files read, "
        f"{meta.get('documents', 0):,} documents, {meta.get('bytes', 0):,} bytes, "
        f"{meta.get('invalid_utf8_replaced', 0)} invalid UTF-8 sequences replaced",
        f"tokenizer:  sha256 {meta['tokenizer_sha256']}",
        f"            vocab {meta['vocab_size']}, eod {tok['eod_token']!r} = {meta['eod_id']}, "
        f"pad {tok['pad_token']!r} = {meta['pad_id']}",
        f"dtype:      {meta['dtype']}",
    ]
    for m in meta.get("mixture") or []:
        lines.append(
            f"mixture:    {m['name']}: weight {m['weight']:g} ({m['share']:.1%} of training windows), {d / m['dir']}"
        )
    if meta.get("stream"):
        st = meta["stream"]
        lines.append(
            f"streaming:  {len(st['files'])} files read by the '{st['builder']}' builder during training, "
            f"{st['bytes_per_token']:.3f} bytes/token on the first {st['sampled_bytes']:,} bytes"
        )
    lines += [
        "",
        f"{'split':<11}{'tokens':>14}{'documents':>11}{'bytes':>15}{'bytes/token':>13}{'shards':>8}",
    ]
    for name, s in meta["splits"].items():
        bpt = f"{s['bytes_per_token']:.3f}" if s.get("bytes_per_token") else "-"
        lines.append(
            f"{name:<11}{s['tokens']:>14,}{s['documents']:>11,}{s['bytes']:>15,}{bpt:>13}{len(s['shards']):>8}"
        )
    if sample_tokens > 0 and meta["splits"]:
        if split is None:
            split = "validation" if meta["splits"].get("validation", {}).get("tokens") else "train"
        if split not in meta["splits"]:
            raise DataError(f"--split: no split '{split}' in {d}; splits: {', '.join(meta['splits'])}")
        shards = TokenShards(d, split)
        n = min(sample_tokens, len(shards))
        ids = shards.window(0, n).tolist()
        text = load_tokenizer(d / tok["file"]).decode(ids, skip_special_tokens=False)
        lines += ["", f"sample: first {n} tokens of {split}", "-" * 72, text, "-" * 72]
    return "\n".join(lines)
