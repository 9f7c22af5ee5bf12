"""`lm data prepare` in parts (data.parts / --shard i/n): deterministic file->part assignment, parts
prepared by separate processes merge into the same bytes as one run, a run killed with SIGKILL redoes
only the unfinished parts and ends byte-identical to an uninterrupted run, the byte budget."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from data.parts import PARTS_DIR, assign_parts, budget_files, part_name
from data.shards import TokenShards, read_metadata
from data.tokenizer import load_tokenizer
from lm.errors import DataError

from tests.data.conftest import paragraph, run_cli, write_data_config
from tests.helpers import REPO, kill_group, lm_command, lm_env

#: what differs between two runs that wrote the same data (times, where, how fast, how many parts were built now)
VOLATILE = ("created", "timings", "seconds", "built_now", "out_dir", "encode", "num_proc")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def snapshot(out: Path) -> Dict[str, object]:
    """Every file under ``out``: raw bytes, JSON without the volatile keys."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            files[rel] = _strip(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
    return files


def corpus(root: Path, n_files: int = 12) -> Path:
    d = root / "corpus"
    d.mkdir()
    for f in range(n_files):
        paras = [paragraph(f * 100 + i, 20 + (f * 7 + i) % 30) for i in range(8 + f % 5)]
        (d / f"f{f:02d}.txt").write_text("\n\n".join(paras) + "\n")
    return d


def test_assignment_is_contiguous_balanced_and_budgeted(tmp_path):
    assert assign_parts([10] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert assign_parts([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert assign_parts([5], 3) == [0]  # a part may be empty
    parts = assign_parts([3, 9, 1, 4, 4, 8, 2], 3)
    assert parts == sorted(parts) and set(parts) == {0, 1, 2}
    files = []
    for i, size in enumerate([10, 20, 30]):
        files.append(tmp_path / f"{i}")
        files[-1].write_bytes(b"x" * size)
    assert budget_files(files, 35) == files[:2] and budget_files(files, 5) == files[:1]
    assert budget_files(files, None) == files
    with pytest.raises(DataError, match="budget_bytes"):
        budget_files(files, 0)


def test_parts_by_separate_processes_merge_to_the_same_bytes(tmp_path, capsys):
    src = corpus(tmp_path)
    cfg = write_data_config(
        tmp_path / "c.yaml",
        source={"paths": [str(src)]},
        tokenizer={"vocab_size": 320},
        shard_tokens=700,
        num_proc=1,
    )
    # one run, all parts, two processes
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/all", "parts=3", "num_proc=2"])
    assert code == 0, err
    assert out.count("part ") >= 3 and f"prepared {tmp_path}/all" in out
    # a SLURM-like array: each part on its own; the last one merges
    for i in (2, 0, 1):
        code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/arr", "--shard", f"{i}/3"])
        assert code == 0, err
        assert (tmp_path / "arr" / "metadata.json").is_file() == (i == 1), out
    assert snapshot(tmp_path / "all") == snapshot(tmp_path / "arr")

    # the merged index reads like any prepared directory: every document once, each followed by eod
    meta = read_metadata(tmp_path / "all")
    assert meta["layout"]["parts"] == 3 and meta["tokenizer"]["file"] == f"{PARTS_DIR}/tokenizer.json"
    tok = load_tokenizer(tmp_path / "all" / meta["tokenizer"]["file"])
    texts = []
    for split in ("train", "validation"):
        shards = TokenShards(tmp_path / "all", split)
        ids = shards.window(0, len(shards))
        starts = np.asarray(shards.doc_starts).tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert ids[b - 1] == meta["eod_id"]
            texts.append(tok.decode(ids[a : b - 1].tolist()))
    expected = [t for f in sorted(src.iterdir()) for t in f.read_text().split("\n\n")]
    assert sorted(t.strip() for t in texts) == sorted(t.strip() for t in expected)
    assert meta["documents"] == len(expected)

    # up to date; --max-bytes keeps whole files within the budget
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/all", "parts=3"])
    assert code == 0 and "up to date" in out
    budget = sum(f.stat().st_size for f in sorted(src.iterdir())[:4])
    code, out, err = run_cli(
        capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/b", "parts=2", "--max-bytes", str(budget)]
    )
    assert code == 0, err
    assert read_metadata(tmp_path / "b")["source"]["files_read"] == 4

    # one-line errors
    for args, message in (
        (["--shard", "3/3"], "--shard"),
        (["--shard", "x"], "--shard"),
        (["parts=2", "source.max_bytes=1000"], "source.max_bytes"),
    ):
        code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/e", *args])
        assert code != 0 and message in err.strip().splitlines()[-1], (args, err)
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/single"])
    assert code == 0
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={tmp_path}/single", "parts=2"])
    assert code != 0 and "prepared in one piece" in err


@pytest.mark.slow
def test_prepare_killed_midway_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL a `lm data prepare` (its own process group) after its first parts; the rerun keeps them,
    prepares the rest, and the directory equals that of an uninterrupted run byte for byte."""
    cfg = write_data_config(
        tmp_path / "s.yaml",
        source={"kind": "stdlib", "max_invalid_utf8": 1.0},
        tokenizer={"vocab_size": 512, "train_max_bytes": 500_000},
        validation_fraction=0.05,
        budget_bytes=2_400_000,
        parts=8,
        num_proc=1,
        shard_tokens=100_000,
    )
    args = ["data", "prepare", str(cfg)]
    straight = subprocess.run(
        lm_command(*args, f"out_dir={tmp_path}/straight"), env=lm_env(), cwd=REPO, capture_output=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        lm_command(*args, f"out_dir={killed}"),
        env=lm_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (killed / PARTS_DIR / part_name(1, 8) / "part.json").is_file():
            assert proc.poll() is None, "prepare ended before it could be killed"
            assert time.time() < deadline, (
                "prepare did not finish its first part within 300 s (a wait limit, not a speed goal)"
            )
            time.sleep(0.01)
        kill_group(proc)
        proc.wait(30)
    finally:
        kill_group(proc)
    assert not (killed / "metadata.json").exists(), "killed too late: every part was done"
    finished = sorted(p.name for p in (killed / PARTS_DIR).glob("part-*") if (p / "part.json").is_file())
    assert 2 <= len(finished) < 8
    assert not [p for p in (killed / PARTS_DIR).glob("part-*") if not (p / "part.json").is_file()]
    stamps = {name: (killed / PARTS_DIR / name / "part.json").stat().st_mtime_ns for name in finished}

    rerun = subprocess.run(
        lm_command(*args, f"out_dir={killed}"), env=lm_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("done already (kept)") == len(finished)
    assert {name: (killed / PARTS_DIR / name / "part.json").stat().st_mtime_ns for name in finished} == stamps
    assert not [p.name for p in (killed / PARTS_DIR).iterdir() if ".tmp-" in p.name]
    assert snapshot(tmp_path / "straight") == snapshot(killed)
