"""The fault-injection script (lm.training.faults) on a tiny budget: one SIGKILL of a single-process
run, resumed bit-exactly; and its comparison notices a changed loss."""

from __future__ import annotations

import shutil

import pytest

from lm.training import faults

pytestmark = pytest.mark.slow


def test_one_kill_resumes_bit_exactly_and_a_difference_is_seen(tmp_path, capsys):
    results = faults.main(
        ["--kills", "1", "--modes", "single", "--steps", "6", "--seed", "3", "--workdir", str(tmp_path)]
    )
    trial = results[0]["trials"][0]
    assert trial["killed"] and trial["exact"], trial
    assert "| single | 1 | 1 | 100% |" in capsys.readouterr().out
    reference = tmp_path / "single-reference"
    changed = tmp_path / "changed"
    shutil.copytree(reference, changed)
    metrics = changed / "logs" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("train/loss")
    for i, line in enumerate(lines[1:], 1):
        cells = line.split(",")
        if cells[col]:
            cells[col] = str(float(cells[col]) + 1e-3)
            lines[i] = ",".join(cells)
            break
    metrics.write_text("\n".join(lines) + "\n")
    assert faults.compare(reference, reference) is None
    assert "losses differ" in faults.compare(reference, changed)
