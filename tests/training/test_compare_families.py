"""``python -m lm.training.compare_families``: each model trains in its own process, the table holds
every model's validation loss, bits/byte, tokens/s and parameters read back from its run, the plot
is written, and a second call reads finished runs back (with their wall times) instead of training them again."""

from __future__ import annotations

import pytest

from lm.training.compare_families import main, table


@pytest.mark.slow
def test_two_models_table_plot_and_rerun(tmp_path, tiny_data):
    overrides = [
        f"data.out_dir={tiny_data}",
        "data.name=stdlib-tiny",
        "data.source.max_bytes=400000",
        "data.tokenizer.vocab_size=512",
        "data.tokenizer.train_max_bytes=400000",
        "data.validation_fraction=0.1",
        "data.num_proc=1",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        "train.val_batches=2",
        "train.log_every_n_steps=1",
        "probes.every_n_steps=0",
    ]
    argv = ["--models", "gla/tiny", "transformer/tiny", "--out", str(tmp_path), "--steps", "6", "--seeds", "3"]
    for o in overrides:
        argv += ["--set", o]
    rows = main(argv)
    assert [(r["model"], r["seed"]) for r in rows] == [("gla/tiny", 3), ("transformer/tiny", 3)]
    assert (tmp_path / "runs" / "gla-tiny-s3" / "summary.json").is_file()
    for r in rows:
        assert r["step"] == 6 and r["val_loss"] > 0 and r["val_bpb"] > 0 and r["tokens_per_s"] > 0
        assert r["parameters"] > 10_000 and r["wall_s"] is not None
    assert rows[0]["parameters"] != rows[1]["parameters"]
    text = (tmp_path / "compare.md").read_text()
    assert "| gla/tiny |" in text and "| transformer/tiny |" in text
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    logs = {p.name: p.stat().st_size for p in tmp_path.glob("*.log")}
    assert len(logs) == 2
    again = main(argv)  # finished runs are read back, not retrained (no lm train ran: logs unchanged)
    assert {p.name: p.stat().st_size for p in tmp_path.glob("*.log")} == logs
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in rows]
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in rows]  # kept from the runs that trained


def test_table_aggregates_seeds():
    rows = [
        {
            "model": m,
            "seed": s,
            "parameters": 1000,
            "step": 10,
            "val_loss": v,
            "val_bpb": None,
            "tokens_per_s": 5.0,
            "wall_s": 60.0,
        }
        for m, s, v in (("a", 0, 1.0), ("a", 1, 3.0), ("b", 0, 2.0))
    ]
    text = table(rows, "h")
    assert "| a | 2 | 2.0000 ± 1.4142 | 1.0000 | 3.0000 | 5 |" in text
    assert "| b | 1 | 2.0000 ± 0.0000 |" in text and text.count("| a | 0 |") == 1
