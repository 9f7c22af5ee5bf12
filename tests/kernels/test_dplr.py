"""dplr fast paths (chunked PyTorch, chunked Triton, fused-recurrent Triton) against the reference:
outputs, final states and the gradients of every input (initial state included). The cases shared
with delta_rule are in :mod:`tests.kernels.chunked_op_cases`."""

import pytest
import torch

import kernels
import kernels.ops.dplr as dplr_op
from tests.kernels import harness
from tests.kernels.chunked_op_cases import ChunkedOpCases

OP = "dplr"


class TestDplr(ChunkedOpCases):
    OP = OP
    OP_MODULE = dplr_op
    TRITON_SHAPE = dict(B=1, H=2, K=16, V=32)


def test_bad_shapes_name_the_argument():
    args, _ = harness.make_inputs(OP, T=5)
    bad = dict(args, a=args["a"][:, :, :, :3])
    with pytest.raises(ValueError, match="^a:"):
        kernels.dplr(**bad, backend="torch")
    bad = dict(args, g=args["g"][:, :, :1])
    with pytest.raises(ValueError, match="^g:"):
        kernels.dplr(**bad, backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        kernels.dplr(**args, initial_state=torch.zeros(2, 3, 8, 6), backend="torch")
    with pytest.raises(ValueError, match="g"):
        kernels.dplr(**dict(args, g=args["g"].detach().abs() + 0.1), backend="torch")
