"""Numbers for docs/hybrids.md: state memory per sequence (meta device, exact) and decode tokens/s with
the KV cache grown by ``torch.cat`` per token against the preallocated cache (``reserve_state``).

Run: ``python scripts/hybrid_evidence.py [--new-tokens 1024]`` (CPU, one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.models import build_model  # noqa: E402
from lm.models.counting import build_on_meta  # noqa: E402

NAMES = ("gla", "hybrid-gla", "gated_deltanet", "hybrid-gated_deltanet", "transformer")
CONTEXTS = (512, 2048, 8192, 32768)
VOCAB = {"small": 8192, "125m": 50304}


def config(name: str, size: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "model" / name / f"{size}.yaml").read_text())


def memory_table() -> str:
    """Bytes of the token-mixer states of one sequence after T tokens, bf16 activations."""
    lines = [
        "| model | size | parameters | " + " | ".join(f"state @ {T}" for T in CONTEXTS) + " |",
        "|---|---|---|" + "---|" * len(CONTEXTS),
    ]
    for size in VOCAB:
        for name in NAMES:
            model = build_on_meta({**config(name, size), "vocab_size": VOCAB[size]})
            cells = [f"{sum(model.state_sizes(1, T, torch.bfloat16)) / 2**20:.2f} MiB" for T in CONTEXTS]
            lines.append(f"| {name} | {size} | {model.num_parameters() / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def decode_table(new_tokens: int, prompt: int = 64, reps: int = 3) -> str:
    """Median greedy-decode tokens/s (batch 1, fp32, one thread) of the small configs, both caches."""
    torch.set_num_threads(1)
    lines = ["| model (small) | KV cache grown by cat | preallocated |", "|---|---|---|"]
    for name in ("transformer", "hybrid-gla"):
        torch.manual_seed(0)
        model = build_model({**config(name, "small"), "vocab_size": 8192, "max_seq_len": 4096}).eval()
        tokens = torch.randint(0, 8192, (1, prompt))
        speed = {"cat": [], "prealloc": []}
        for _ in range(reps):
            for mode in speed:
                logits, state = model(tokens, return_state=True)
                if mode == "prealloc":
                    state = model.reserve_state(state, prompt + new_tokens)
                token = logits[:, -1].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    logits, state = model.step(token, state)
                    token = logits.argmax(-1)
                speed[mode].append(new_tokens / (time.perf_counter() - t0))
        lines.append(f"| {name} | {statistics.median(speed['cat']):.1f} | {statistics.median(speed['prealloc']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=1024)
    args = parser.parse_args()
    print(memory_table())
    print()
    print(decode_table(args.new_tokens))


if __name__ == "__main__":
    main()
