"""Test cases shared by the ops with a chunked WY/UT PyTorch path, a chunked Triton path and a
fused-recurrent Triton path (delta_rule, dplr): every path against the reference, outputs, final
states and the gradients of every input. A test module subclasses :class:`ChunkedOpCases` as
``Test<Op>`` and sets ``OP``, ``OP_MODULE`` and ``TRITON_SHAPE``."""

from types import ModuleType
from typing import Dict

import pytest
import torch

from tests.kernels import harness


class ChunkedOpCases:
    OP: str
    OP_MODULE: ModuleType
    #: small shapes for the Triton kernels (the CPU interpreter is slow)
    TRITON_SHAPE: Dict[str, int]
    #: a head width (keys) above the chunked Triton kernels' limit
    WIDE_HEAD_K: int = 130

    # ------------------------------------------------------------ chunked PyTorch path

    @pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
    @pytest.mark.parametrize("decay", harness.DECAYS)
    @pytest.mark.parametrize("with_state", [False, True])
    def test_torch_matches_reference(self, T, decay, with_state):
        harness.compare_backends(self.OP, "torch", T=T, decay=decay, with_state=with_state, seed=T)

    def test_torch_bf16(self):
        harness.compare_backends(self.OP, "torch", dtype=torch.bfloat16, T=130, with_state=True)

    @pytest.mark.parametrize("split", [50, 64])
    def test_torch_split_equals_one_pass(self, split):
        harness.check_split(self.OP, "torch", split, T=150, with_state=True)

    def test_torch_larger_heads(self):
        harness.compare_backends(self.OP, "torch", B=1, T=100, H=3, K=32, V=48, decay="moderate", with_state=True)

    def test_non_contiguous_inputs(self):
        args, state = harness.make_inputs(self.OP, T=70, with_state=True)
        # same values, non-contiguous layouts
        strided = {n: x.detach().transpose(1, 2).contiguous().transpose(1, 2) for n, x in args.items()}
        assert not strided["q"].is_contiguous()
        o_ref, s_ref = harness.run(self.OP, args, state, "reference")
        o, s = harness.run(self.OP, strided, state, "torch")
        harness.assert_close("output (torch)", o, o_ref, 1e-4)
        harness.assert_close("final_state (torch)", s, s_ref, 1e-4)

    @pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
    def test_very_strong_decay_stays_finite(self, backend, monkeypatch):
        if backend == "triton":
            harness.require_triton()
            monkeypatch.setattr(self.OP_MODULE, "RECURRENT_MAX_T", 0)  # the chunked kernels
        # g = -30 per step: forming exp(-G) would overflow fp32 (exp(30 * 63)); every exponent must stay
        # <= 0, and the tiny decay gradients must not drown in rounding
        shape = self.TRITON_SHAPE if backend == "triton" else {}
        args, state = harness.make_inputs(self.OP, T=64, with_state=True, **shape)
        args["g"] = torch.full_like(args["g"], -30.0).requires_grad_()
        o_ref, s_ref, g_ref = harness.forward_backward(self.OP, args, state, "reference")
        o, s, grads = harness.forward_backward(self.OP, args, state, backend)
        harness.assert_close("output", o, o_ref, 1e-4)
        harness.assert_close("final_state", s, s_ref, 1e-4)
        for name in g_ref:
            harness.assert_close(f"grad {name}", grads[name], g_ref[name], 1e-4)

    @pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
    def test_empty_sequence_passes_the_state_through(self, backend):
        if backend == "triton":
            harness.require_triton()
        args, state = harness.make_inputs(self.OP, T=0, with_state=True)
        o, s = harness.run(self.OP, args, state, backend)
        assert o.shape == (2, 0, 2, 6) and o.dtype == args["q"].dtype
        assert torch.equal(s, state)

    # ------------------------------------------------------------ Triton paths (interpreter on CPU)

    @pytest.fixture
    def triton_path(self, request, monkeypatch):
        """Route backend='triton' to one path: 'chunk' or 'recurrent'."""
        harness.require_triton()
        monkeypatch.setattr(self.OP_MODULE, "RECURRENT_MAX_T", 0 if request.param == "chunk" else 10**9)
        return request.param

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
    @pytest.mark.parametrize("T", [1, 7])
    def test_triton_short(self, triton_path, T):
        harness.compare_backends(self.OP, "triton", T=T, decay="moderate", with_state=True, seed=T, **self.TRITON_SHAPE)

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
    @pytest.mark.parametrize("decay", harness.DECAYS)
    def test_triton_chunk_decays(self, triton_path, decay):
        harness.compare_backends(
            self.OP, "triton", T=65, decay=decay, with_state=decay != "strong", **self.TRITON_SHAPE
        )

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
    def test_triton_bf16(self, triton_path):
        harness.compare_backends(
            self.OP,
            "triton",
            dtype=torch.bfloat16,
            T=65 if triton_path == "chunk" else 7,
            with_state=True,
            **self.TRITON_SHAPE,
        )

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
    def test_triton_split_equals_one_pass(self, triton_path):
        harness.check_split(self.OP, "triton", 30, T=80, with_state=True, **self.TRITON_SHAPE)

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
    def test_triton_chunk_of_32_for_wide_heads(self, triton_path, monkeypatch):
        # heads wider than WIDE_HEAD run with 32-step chunks; pretend K = 32 is wide to cover that path
        from kernels.ops.common import tiles as triton_utils

        monkeypatch.setattr(triton_utils, "WIDE_HEAD", 16)
        assert triton_utils.chunk_length(32, 16) == 32
        harness.compare_backends(self.OP, "triton", T=70, decay="moderate", with_state=True, **self.TRITON_SHAPE)

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["recurrent"], indirect=True)
    def test_triton_recurrent_backward_in_value_blocks(self, triton_path, monkeypatch):
        # wide keys shrink the fused-recurrent value blocks (the state, and in the backward its gradient, on
        # chip): here 32 in the forward (V = 40 in two blocks) and 16 in the backward (three), the last masked
        from kernels.ops.common import recurrent

        monkeypatch.setattr(recurrent, "FWD_STATE_ELEMS", 16 * 32)
        monkeypatch.setattr(recurrent, "BWD_STATE_ELEMS", 16 * 16)
        harness.compare_backends(self.OP, "triton", B=1, T=7, H=2, K=16, V=40, decay="moderate", with_state=True)

    @pytest.mark.triton
    def test_triton_falls_back_for_very_wide_heads(self):
        harness.require_triton()
        args, state = harness.make_inputs(self.OP, B=1, T=20, H=1, K=self.WIDE_HEAD_K, V=8, with_state=True)
        with pytest.warns(UserWarning, match="chunked PyTorch path"):
            o, s = harness.run(self.OP, args, state, "triton")
        o_ref, s_ref = harness.run(self.OP, args, state, "reference")
        harness.assert_close("output", o, o_ref, 1e-4)
        harness.assert_close("final_state", s, s_ref, 1e-4)

    @pytest.mark.triton
    def test_triton_dispatch_picks_by_length(self):
        harness.require_triton()
        # default routing: fused-recurrent for short T, chunked otherwise; both through the public API
        for T in (self.OP_MODULE.RECURRENT_MAX_T, self.OP_MODULE.RECURRENT_MAX_T + 1):
            args, state = harness.make_inputs(self.OP, T=T, with_state=True, **self.TRITON_SHAPE)
            strided = {n: x.detach().transpose(1, 2).contiguous().transpose(1, 2) for n, x in args.items()}
            with torch.no_grad():
                o_ref, s_ref = harness.run(self.OP, args, state, "reference")
                o, s = harness.run(self.OP, strided, state, "triton")
            harness.assert_close("output", o, o_ref, 1e-4)
            harness.assert_close("final_state", s, s_ref, 1e-4)
