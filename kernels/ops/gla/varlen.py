"""Packed sequences (``cu_seqlens``) for the chunked gla paths: the per-sequence state terms.

The chunked passes (``chunk.py``, ``triton_chunk.py``) run over the packed input (B = 1) in chunks of
C steps that may hold several sequences. With ``seq[t]`` the sequence of step t, ``c0`` a chunk's first
step and ``b`` the cumulative log decay inside the chunk, they compute:

- intra-chunk pairs (t, s) only where ``seq[t] == seq[s]``;
- the entering state ``S_in[n]`` (the state of ``seq[c0]`` just before c0) only for the steps with
  ``seq[t] == seq[c0]``: ``o_t += scale (q_t e^{b_t})^T S_in[n]``;
- ``S_in[n+1] = flows_n (d_n e^{b_last} S_in[n] + sum_{seq[s] = seq[c1]} e^{b_last - b_s} k_s v_s^T)
  + X[n+1]`` with c1 the chunk's last step, ``flows_n`` = the sequence at c1 continues into chunk n+1,
  ``d_n`` = it began at or before c0 (``seq[c0] == seq[c1]``).

This module adds, with vectorised gathers of one chunk window per sequence (autograd differentiates it):

- ``injection``: ``X[n]``, the initial state ``h0[m]`` of the sequence m at step c0 of chunk n,
  decayed over its steps before c0: ``X[n] = exp(sum_{st_m <= s < c0} g_s) h0[m]`` when m began at
  c0 or inside chunk n-1 (otherwise its state is carried; X[0] = h0 of the first sequence);
- ``initial_state_output``: for a sequence m that begins strictly inside a chunk, its rows t of that
  chunk get ``scale (q_t exp(sum_{st_m <= s <= t} g_s))^T h0[m]``;
- ``final_states``: the state at the last step e of every sequence, from its chunk n_e:
  ``exp(sum_{p <= s <= e} g_s) E + sum_{p <= s <= e} exp(sum_{s < s' <= e} g_s') k_s v_s^T`` with
  ``p = max(st_m, c0)`` and ``E = S_in[n_e]`` if m began at or before c0, else ``h0[m]``.

Every exponent is a sum of log decays (<= 0), masked to ``-inf`` outside its range before ``exp``.
Zero-length sequences take no steps: ``Layout`` drops them and ``assemble_finals`` returns their
initial state (or zeros) as their final state.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from kernels._chunk_utils import masked_exp_diff


class Layout:
    """Host-side description of the packed sequences for chunks of ``C`` steps (one host read of cu).

    Attributes: ``T``, ``C``, ``NC`` (chunks), ``keep`` (indices of the non-empty sequences, M of them),
    ``starts``/``ends`` (their step ranges), ``seq`` (long [T], index among the non-empty sequences).
    """

    def __init__(self, cu_seqlens, T: int, C: int, device):
        offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        self.T, self.C, self.N = T, C, len(offsets) - 1
        self.NC = -(-T // C)
        self.keep = [n for n in range(self.N) if offsets[n + 1] > offsets[n]]
        self.starts = [offsets[n] for n in self.keep]
        self.ends = [offsets[n + 1] for n in self.keep]
        self.device = device
        lengths = torch.tensor([e - s for s, e in zip(self.starts, self.ends)], dtype=torch.long)
        self.seq = torch.repeat_interleave(torch.arange(len(self.keep)), lengths).to(device)

    @property
    def M(self) -> int:
        return len(self.keep)

    def seq_chunks(self, pad_value: int = -1) -> torch.Tensor:
        """long [NC, C]: the sequence of every step, padded steps ``pad_value``."""
        seq = torch.full((self.NC * self.C,), pad_value, dtype=torch.long, device=self.device)
        seq[:self.T] = self.seq
        return seq.view(self.NC, self.C)

    def flows(self) -> torch.Tensor:
        """bool [NC]: the sequence at a chunk's last step continues into the next chunk."""
        ends = set(self.ends)
        flows = [(n + 1) * self.C not in ends for n in range(self.NC - 1)] + [False]
        return torch.tensor(flows, dtype=torch.bool, device=self.device)

    def injections(self) -> List[tuple]:
        """(chunk n, sequence m) for every sequence m at the first step c0 of chunk n that began at or
        after ``c0 - C`` (its initial state enters the chunk recurrence there; chunk 0 always)."""
        entries = [(0, 0)]
        m = 0
        for n in range(1, self.NC):
            c0 = n * self.C
            while self.ends[m] <= c0:
                m += 1
            if self.starts[m] > c0 - self.C:
                entries.append((n, m))
        return entries

    def chunk_flags(self) -> torch.Tensor:
        """int32 [NC + 1]: bit 0 where ``injection`` may be non-zero, bit 1 where ``final_states`` reads
        the entering state (so its gradient may be non-zero); the Triton loops skip the other chunks."""
        flags = [0] * (self.NC + 1)
        for n, _ in self.injections():
            flags[n] |= 1
        for s, e in zip(self.starts, self.ends):
            n = (e - 1) // self.C
            if s <= n * self.C:
                flags[n] |= 2
        return torch.tensor(flags, dtype=torch.int32, device=self.device)

    def select(self, h0: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The initial states of the non-empty sequences (fp32 [M, H, K, V]) or None."""
        if h0 is None:
            return None
        return h0.float().index_select(0, torch.tensor(self.keep, dtype=torch.long, device=h0.device))


def _windows(x: torch.Tensor, chunks: Sequence[int], C: int) -> torch.Tensor:
    """Rows of chunk ``chunks[i]`` of x [1, T, ...] -> fp32 [len(chunks), C, ...] (rows past T: zero)."""
    T = x.shape[1]
    idx = torch.tensor(chunks, dtype=torch.long, device=x.device)[:, None] * C + torch.arange(C, device=x.device)
    ok = idx < T
    w = x[0].float().index_select(0, idx.clamp_max(T - 1).flatten()).view(len(chunks), C, *x.shape[2:])
    return w * ok.view(len(chunks), C, *([1] * (x.dim() - 2)))


def _row_mask(chunks: Sequence[int], lo: Sequence[int], hi: Sequence[int], C: int, device) -> torch.Tensor:
    """bool [len(chunks), C]: rows t of each window with ``lo <= t < hi`` (absolute steps)."""
    t = torch.tensor(chunks, dtype=torch.long)[:, None] * C + torch.arange(C)
    m = (t >= torch.tensor(lo)[:, None]) & (t < torch.tensor(hi)[:, None])
    return m.to(device)


def _gate(g: torch.Tensor) -> torch.Tensor:
    """g [1, T, H] or [1, T, H, K] -> [1, T, H, 1 or K]."""
    return g.unsqueeze(-1) if g.dim() == 3 else g


def _bcast(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.view(*mask.shape, *([1] * (ndim - 2)))


def injection(g: torch.Tensor, h0: Optional[torch.Tensor], L: Layout) -> Optional[torch.Tensor]:
    """X [H, NC + 1, K, V] (fp32): the initial state entering the chunked recurrence at chunk n (or None)."""
    if h0 is None:
        return None
    H, K, V = h0.shape[1:]
    C = L.C
    entries = L.injections()
    chunks = [n for n, _ in entries]
    seqs = torch.tensor([m for _, m in entries], dtype=torch.long, device=h0.device)
    prev = [max(n - 1, 0) for n in chunks]
    # decay over the sequence's steps in the previous chunk: [st_m, c0)
    lo = [L.starts[m] if n else 0 for n, m in entries]
    hi = [n * C for n in chunks]
    gw = _windows(_gate(g), prev, C)  # [E, C, H, Kg]
    mask = _bcast(_row_mask(prev, lo, hi, C, g.device), gw.dim())
    decay = torch.exp((gw * mask).sum(1))  # [E, H, Kg]
    vals = h0.index_select(0, seqs) * decay[..., None]
    X = torch.zeros(L.NC + 1, H, K, V, device=h0.device, dtype=torch.float32)
    X = X.index_copy(0, torch.tensor(chunks, dtype=torch.long, device=h0.device), vals)
    return X.transpose(0, 1)


def initial_state_output(q: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor], L: Layout,
                         scale: float) -> Optional[torch.Tensor]:
    """fp32 [T, H, V]: the initial states' contribution to the rows of sequences that begin strictly
    inside a chunk (the others receive theirs through ``injection``), or None."""
    if h0 is None:
        return None
    C = L.C
    ms = [m for m in range(L.M) if L.starts[m] % C]
    if not ms:
        return None
    chunks = [L.starts[m] // C for m in ms]
    lo = [L.starts[m] for m in ms]
    hi = [min(L.ends[m], (L.starts[m] // C + 1) * C) for m in ms]
    gw = _windows(_gate(g), chunks, C)  # [M', C, H, Kg]
    mask = _bcast(_row_mask(chunks, lo, hi, C, g.device), gw.dim())
    decay = torch.exp((gw * mask).cumsum(1)) * mask  # exp(sum_{st <= s <= t} g_s) on the sequence's rows
    qw = _windows(q, chunks, C) * decay
    seqs = torch.tensor(ms, dtype=torch.long, device=q.device)
    term = scale * torch.einsum("mchk,mhkv->mchv", qw, h0.index_select(0, seqs))
    rows = (torch.tensor(chunks, dtype=torch.long, device=q.device)[:, None] * C
            + torch.arange(C, device=q.device)).clamp_max(L.T - 1)  # rows past T carry zeros
    out = q.new_zeros(L.T, *term.shape[2:], dtype=torch.float32)
    return out.index_add(0, rows.flatten(), term.flatten(0, 1))


def final_states(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, entering: torch.Tensor,
                 h0: Optional[torch.Tensor], L: Layout) -> torch.Tensor:
    """fp32 [M, H, K, V]: each non-empty sequence's state at its last step.

    ``entering``: [H, >= NC, K, V], the states ``S_in[n]`` entering the chunks (see the module doc)."""
    C = L.C
    last = [e - 1 for e in L.ends]
    chunks = [e // C for e in last]
    lo = [max(s, n * C) for s, n in zip(L.starts, chunks)]
    hi = [e + 1 for e in last]
    gw = _windows(_gate(g), chunks, C)  # [M, C, H, Kg]
    maskr = _row_mask(chunks, lo, hi, C, g.device)
    mask = _bcast(maskr, gw.dim())
    cs = (gw * mask).cumsum(1)  # sum over [p, t] for rows t >= p
    at_last = torch.tensor([e - n * C for e, n in zip(last, chunks)], dtype=torch.long, device=g.device)
    cs_e = cs.gather(1, at_last.view(-1, 1, 1, 1).expand(-1, 1, *cs.shape[2:]))  # [M, 1, H, Kg]
    wk = masked_exp_diff(cs_e, cs, mask)  # exp(sum_{s < s' <= e} g_s') on [p, e]
    U = torch.einsum("mchk,mchv->mhkv", _windows(k, chunks, C) * wk, _windows(v, chunks, C))
    idx = torch.tensor(chunks, dtype=torch.long, device=k.device)
    E = entering.index_select(1, idx).transpose(0, 1)  # [M, H, K, V]
    carried = torch.tensor([s <= n * C for s, n in zip(L.starts, chunks)], device=k.device)
    if h0 is not None:
        E = torch.where(carried.view(-1, 1, 1, 1), E, h0)
    else:
        E = E * carried.view(-1, 1, 1, 1)
    return torch.exp(cs_e[:, 0])[..., None] * E + U


def assemble_finals(finals: torch.Tensor, h0: Optional[torch.Tensor], L: Layout) -> torch.Tensor:
    """[N, H, K, V]: ``finals`` ([M], the non-empty sequences) in place, zero-length ones keep h0 (or 0)."""
    if L.M == L.N:
        return finals
    empty = h0.float() if h0 is not None else finals.new_zeros(L.N, *finals.shape[1:])
    order: List[int] = list(range(L.N))
    for i, n in enumerate(L.keep):
        order[n] = L.N + i
    return torch.cat([empty, finals], 0).index_select(0, torch.tensor(order, dtype=torch.long,
                                                                     device=finals.device))
