"""Golden outputs for refactoring: every kernel op and backend, and every model family, on fixed seeds.

    python -m tests.golden --save /tmp/golden.pt      # before a refactor
    python -m tests.golden --check /tmp/golden.pt     # after it: every tensor must be bit-identical

Records, for each op x backend (reference, torch, and triton under ``TRITON_INTERPRET=1`` when
Triton is installed) with and without an initial state and packed with ``cu_seqlens``: the output,
the final state and the gradient of every input under a fixed cotangent; for each registered model
variant (tiny, fp32): logits, the returned state and every parameter gradient, as one stream and
with document starts. ``--check`` compares with ``torch.equal`` and lists every difference.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterator, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from tests.kernels.harness import OPS, forward_backward, make_inputs  # noqa: E402
from tests.kernels.varlen_cases import make_packed, packed_forward_backward  # noqa: E402


def _backends() -> Tuple[str, ...]:
    from kernels._dispatch import triton_available

    return ("reference", "torch", "triton") if triton_available() else ("reference", "torch")


def _tensors(prefix: str, value) -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(f"{prefix}.{k}", v)
    else:
        for i, t in enumerate(tree_leaves(value)):
            if isinstance(t, torch.Tensor):
                yield f"{prefix}[{i}]", t.detach().cpu().clone()


def kernel_outputs() -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for op in OPS:
        for backend in _backends():
            for with_state in (False, True):
                args, state = make_inputs(op, B=2, T=21, H=2, K=16, V=16, with_state=with_state, seed=3)
                o, final, grads = forward_backward(op, args, state, backend)
                out.update(_tensors(f"{op}/{backend}/state={with_state}", {"out": o, "final": final, "grads": grads}))
            args, state, cu = make_packed(op, lengths=(5, 1, 17, 0, 9), with_state=True, seed=4)
            o, final, grads = packed_forward_backward(op, args, state, cu, backend)
            out.update(_tensors(f"{op}/{backend}/packed", {"out": o, "final": final, "grads": grads}))
    return out


def model_outputs() -> Dict[str, torch.Tensor]:
    from lm.models import build_model
    from lm.models.registry import FAMILIES

    out: Dict[str, torch.Tensor] = {}
    starts = torch.zeros(2, 19, dtype=torch.bool)
    starts[0, 6] = starts[0, 7] = starts[1, 0] = starts[1, 12] = True
    for family, spec in sorted(FAMILIES.items()):
        for variant in sorted(spec.variants):
            torch.manual_seed(0)
            model = build_model(
                {
                    "family": family,
                    "variant": variant,
                    "vocab_size": 61,
                    "d_model": 32,
                    "n_layers": 2,
                    "n_heads": 2,
                    "kernel_backend": "torch",
                }
            )
            tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1))
            for mode, kwargs in (("stream", {}), ("reset", {"doc_starts": starts})):
                model.zero_grad()
                logits, state = model(tokens, return_state=family != "transformer" or mode == "stream", **kwargs)
                (
                    logits.float() * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
                ).sum().backward()
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                out.update(
                    _tensors(f"model/{family}/{variant}/{mode}", {"logits": logits, "state": state, "grads": grads})
                )
    return out


def collect() -> Dict[str, torch.Tensor]:
    return {**kernel_outputs(), **model_outputs()}


def check(saved: Dict[str, torch.Tensor], now: Dict[str, torch.Tensor]) -> list:
    problems = [f"missing now: {k}" for k in saved if k not in now]
    problems += [f"new: {k}" for k in now if k not in saved]
    for k in saved.keys() & now.keys():
        a, b = saved[k], now[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{k}: {tuple(a.shape)} {a.dtype} -> {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b) and not (torch.isnan(a).any() and torch.equal(a.nan_to_num(), b.nan_to_num())):
            diff = (a.double() - b.double()).abs().nan_to_num().max().item()
            problems.append(f"{k}: differs (max |diff| {diff:.3g})")
    return sorted(problems)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the golden tensors here")
    group.add_argument("--check", help="compare with the golden tensors saved here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # thread counts change reduction orders
    now = collect()
    if args.save:
        torch.save(now, args.save)
        print(f"saved {len(now)} tensors to {args.save}")
        return 0
    problems = check(torch.load(args.check), now)
    for line in problems:
        print(line)
    print(f"{len(now)} tensors: " + ("all bit-identical" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
