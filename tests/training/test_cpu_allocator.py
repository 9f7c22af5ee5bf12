"""The glibc tuning of lm.training.cpu_allocator: freed large tensors stay in the process."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys, torch
from lm.training.cpu_allocator import keep_freed_memory
applied = keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(32 * 2**20)  # 128 MiB, above glibc's mmap threshold
before_free = rss()
del x
print(applied, (before_free - rss()) / 2**20)
"""


def _run(env_value):
    env = {"LM_CPU_ALLOCATOR": env_value} if env_value else {}
    import os

    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_freed_tensor_memory_stays_in_the_process():
    applied, released = _run(None)
    assert applied
    assert released < 16, f"{released:.0f} MiB went back to the system"
    applied, released = _run("default")  # the switch off: glibc unmaps the 128 MiB on free
    assert not applied
    assert released > 100, released
