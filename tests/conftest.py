"""Suite-wide settings: offline, quiet, deterministic; Triton on the CPU interpreter without a GPU."""

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter; must be set before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests use small tensors: one thread per process (pytest-xdist runs a process per core)
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared corpus shared by the session (see tests/helpers.py)."""
    from tests.helpers import prepare_tiny_data

    return prepare_tiny_data(tmp_path_factory.mktemp("data") / "stdlib-tiny")
