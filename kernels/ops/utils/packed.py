"""Packed sequences (``cu_seqlens``) for the chunked paths: the per-sequence state terms.

The chunked passes (``gla``'s ``torch_chunk.py`` and ``triton_chunk.py``; ``delta_rule``'s and ``dplr``'s
``torch_chunk.py`` through :func:`run_packed`) run over the packed input (B = 1) in chunks of C steps
that may hold several sequences. With ``seq[t]`` the sequence of step t, ``c0`` a chunk's first step and ``b`` the cumulative log decay inside the chunk, they compute:

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

``final_states`` also takes several rank-one updates per step (dplr adds ``b_s z_s^T`` to ``k_s v_s^T``).
Shared by the chunked PyTorch passes of delta_rule and dplr: ``chunk_masks`` (same sequence / first /
tail / carry), ``before_start`` (decays since each sequence's first step in its chunk),
``Layout.begin_inside`` (the sequences beginning strictly inside a chunk: chunk, rows, initial state) and
``run_packed``, the driver of a pass over a packed row (layout, injection, passes with the state carried,
initial-state output, final states).

Every exponent is a sum of log decays (<= 0), masked to ``-inf`` outside its range before ``exp``.
Zero-length sequences take no steps: ``Layout`` drops them and ``assemble_finals`` returns their
initial state (or zeros) as their final state.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from kernels.ops.utils.chunks import empty_result, masked_exp_diff


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
        seq[: self.T] = self.seq
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

    def begin_inside(self, h0: Optional[torch.Tensor], n0: int = 0, n1: Optional[int] = None) -> Optional[tuple]:
        """The sequences that begin strictly inside one of the chunks ``n0 <= n < n1`` and have an initial
        state: None, or (their chunk minus n0 (long [M']), their rows in it (bool [M', C]), their initial
        states ``h0[m]`` (from :meth:`select`, [M', ...])). Without h0 (all zero) there are none."""
        if h0 is None:
            return None
        C, n1 = self.C, self.NC if n1 is None else n1
        mine = [m for m in range(self.M) if self.starts[m] % C and n0 <= self.starts[m] // C < n1]
        if not mine:
            return None
        chunks = [self.starts[m] // C for m in mine]
        t = torch.tensor(chunks)[:, None] * C + torch.arange(C)
        lo, hi = (torch.tensor([bounds[m] for m in mine])[:, None] for bounds in (self.starts, self.ends))
        rows = (t >= lo) & (t < hi)
        return (
            torch.tensor(chunks, device=h0.device) - n0,
            rows.to(h0.device),
            h0.index_select(0, torch.tensor(mine, device=h0.device)),
        )

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


def chunk_masks(seqc: torch.Tensor, flows: torch.Tensor):
    """The masks of a chunked pass over packed sequences, from ``seqc`` (long [N, C], the sequence of every
    step) and ``flows`` (bool [N], :meth:`Layout.flows`), all bool: ``same`` [N, C, C] (steps t, s of one
    sequence), ``first`` [N, C] (rows of the chunk's first sequence, which the entering state reaches),
    ``tail`` [N, C] (rows whose updates pass on to the next chunk), ``carry`` [N] (the entering state
    itself passes on: one sequence spans the chunk and continues)."""
    same = seqc[:, :, None] == seqc[:, None, :]
    first = seqc == seqc[:, :1]
    tail = (seqc == seqc[:, -1:]) & flows[:, None]
    carry = flows & (seqc[:, 0] == seqc[:, -1])
    return same, first, tail, carry


def before_start(cum: torch.Tensor, seqc: torch.Tensor, dim: int) -> torch.Tensor:
    """``cum`` (a chunk-local cumulative log decay, chunks on dim 0 and steps on ``dim``) at the step just
    before the first step in the chunk of each row's sequence (0 for the chunk's first sequence), so that
    ``cum - before_start(...)`` is the cumulative decay since the sequence began in the chunk."""
    N, C = seqc.shape
    pos = torch.arange(C, device=seqc.device)
    begins = torch.cat([torch.ones_like(seqc[:, :1], dtype=torch.bool), seqc[:, 1:] != seqc[:, :-1]], 1)
    shape = [1] * cum.dim()
    shape[0], shape[dim] = N, C
    p = torch.where(begins, pos, torch.zeros_like(pos)).cummax(1).values.view(shape)
    return torch.where(p > 0, cum.gather(dim, (p - 1).clamp_min(0).expand_as(cum)), torch.zeros_like(cum))


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


def initial_state_output(
    q: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor], L: Layout, scale: float
) -> Optional[torch.Tensor]:
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
    rows = (
        torch.tensor(chunks, dtype=torch.long, device=q.device)[:, None] * C + torch.arange(C, device=q.device)
    ).clamp_max(L.T - 1)  # rows past T carry zeros
    out = q.new_zeros(L.T, *term.shape[2:], dtype=torch.float32)
    return out.index_add(0, rows.flatten(), term.flatten(0, 1))


def final_states(k, v, g: torch.Tensor, entering: torch.Tensor, h0: Optional[torch.Tensor], L: Layout) -> torch.Tensor:
    """fp32 [M, H, K, V]: each non-empty sequence's state at its last step.

    ``k`` [1, T, H, K], ``v`` [1, T, H, V]: the step's update ``k_s v_s^T``; or equal-length sequences of
    them for a sum of rank-one updates ``sum_i k_i,s v_i,s^T``. ``entering``: [H, >= NC, K, V], the states
    ``S_in[n]`` entering the chunks (see the module doc)."""
    keys, values = ((k,), (v,)) if isinstance(k, torch.Tensor) else (tuple(k), tuple(v))
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
    U = None
    for k_i, v_i in zip(keys, values):
        term = torch.einsum("mchk,mchv->mhkv", _windows(k_i, chunks, C) * wk, _windows(v_i, chunks, C))
        U = term if U is None else U + term
    idx = torch.tensor(chunks, dtype=torch.long, device=g.device)
    E = entering.index_select(1, idx).transpose(0, 1)  # [M, H, K, V]
    carried = torch.tensor([s <= n * C for s, n in zip(L.starts, chunks)], device=g.device)
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
    return torch.cat([empty, finals], 0).index_select(0, torch.tensor(order, dtype=torch.long, device=finals.device))


def run_packed(
    pass_fn: Callable,
    steps: Sequence[Optional[torch.Tensor]],
    gate: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens,
    C: int,
    segment: Optional[int],
    updates: Callable,
):
    """A chunked pass over packed sequences (B = 1, matrix states [N, H, K, V]), with the state terms above.

    ``steps``: the per-step inputs [1, T, ...] (or None), q first and v third; ``gate``: the log decays
    [1, T, H] or [1, T, H, K]. The row runs in passes of ``segment`` steps (a multiple of C; None: one pass),
    the state carried: ``pass_fn(steps of the pass, S [1, H, K, V], seqc [n, C], flows [n], X [H, n + 1,
    K, V] or None, own)`` (``seqc``/``flows``/``X`` of the pass's n chunks, ``own``:
    :meth:`Layout.begin_inside` of them) returns the output (fp32 [1, t, H, V], without
    :func:`initial_state_output`), a per-step value of the pass (any form), the entering states
    [H, n, K, V] and the state entering the next pass. ``updates(steps, the passes' per-step values)``
    gives the (keys, values) of the state updates for :func:`final_states` (called only for final states).
    Returns (output [1, T, H, V] in q's dtype, final states [N, H, K, V] or None)."""
    q, v = steps[0], steps[2]
    T, H, K, V = q.shape[1], q.shape[2], q.shape[3], v.shape[-1]
    L = Layout(cu_seqlens, T, C, q.device)
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state, n_states=L.N)
    h0 = L.select(initial_state)
    X = injection(gate, h0, L)
    seqc, flows = L.seq_chunks(), L.flows()
    S = X[:, 0][None] if X is not None else q.new_zeros(1, H, K, V, dtype=torch.float32)
    step = T if segment is None or segment >= T else segment
    outs, per_step, entering = [], [], []
    for a in range(0, T, step):  # passes of ``segment`` steps, the state carried
        n0, n1 = a // C, -(-min(a + step, T) // C)
        x = X[:, n0 : n1 + 1] if X is not None else None
        piece = [None if z is None else z[:, a : a + step] for z in steps]
        o, w, ent, S = pass_fn(piece, S, seqc[n0:n1], flows[n0:n1], x, L.begin_inside(h0, n0, n1))
        outs.append(o)
        per_step.append(w)
        entering.append(ent)
    o = torch.cat(outs, 1)[0].float()
    extra = initial_state_output(q, gate, h0, L, scale)
    if extra is not None:
        o = o + extra
    o = o[None].to(q.dtype)
    if not output_final_state:
        return o, None
    keys, values = updates(steps, per_step)
    finals = final_states(keys, values, gate, torch.cat(entering, 1), h0, L)
    return o, assemble_finals(finals, initial_state, L)
