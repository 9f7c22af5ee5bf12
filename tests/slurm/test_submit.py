"""``lm submit`` without a cluster: SLURM time formats, the rendered scripts of the three variants
(valid bash, the options that make pre-emption safe), and one-line errors for bad input (no sbatch,
an invalid time, GPUs for a CPU run, ...); ``lm status`` of a run without SLURM; the early USR1
handler under SLURM; cluster.sh refusing to run without root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from lm.errors import ConfigError, LMError
from lm.slurm.timefmt import check_time, time_seconds
from tests.helpers import experiment

CLUSTER_SH = Path(__file__).with_name("cluster.sh")


def lm(capsys, *args, env_path=None, monkeypatch=None):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    from lm.cli.main import main

    if env_path is not None:
        monkeypatch.setenv("PATH", env_path)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "value,seconds",
    [
        ("30", 1800),
        ("90", 5400),
        ("5:30", 330),
        ("1:00:00", 3600),
        ("36:00:00", 129600),
        ("2-0", 172800),
        ("1-12", 129600),
        ("1-2:30", 95400),
        ("0-00:00:10", 10),
        ("3-23:59:59", 345599),
    ],
)
def test_slurm_time_formats(value, seconds):
    assert time_seconds(value) == seconds
    assert check_time(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "1h", "1:2:3:4", "10:60", "1:60:00", "1:00:60", "2-24", "-5", "1-", "0", "0:00", "1.5", "1 -2"]
)
def test_invalid_slurm_times_name_the_option_and_value(value):
    with pytest.raises(ConfigError) as e:
        check_time(value)
    assert "--time/slurm.time" in str(e.value) and f"'{value}'" in str(e.value)


def _dry_run(capsys, path, *args):
    code, out, err = lm(capsys, "submit", str(path), "--dry-run", *args)
    assert code == 0, err
    return out


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_renders_cpu_job_and_writes_nothing(capsys, tmp_path):
    path = experiment(tmp_path, tmp_path / "corpus", name="dry", train={"devices": 2})
    script = _dry_run(
        capsys,
        path,
        "--time",
        "1-02:00",
        "--cpus-per-task",
        "3",
        "--partition",
        "debug",
        "--account",
        "proj_1",
        "train.max_steps=7",
    )
    lines = script.splitlines()
    for option in [
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=3",
        "--time=1-02:00",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
        "--partition=debug",
        "--account=proj_1",
        f"--output={tmp_path / 'dry' / 'slurm' / 'job-%j.out'}",
    ]:
        assert f"#SBATCH {option}" in lines, option
    assert "gpus" not in script and "NCCL" not in script
    assert f"train {tmp_path / 'dry' / 'slurm' / 'experiment.yaml'} resume=auto &" in script
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=2 --cpus-per-task=3" in script
    assert "trap forward_usr1 USR1" in script and 'kill -USR1 "$child"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "{{" not in script
    _bash_syntax_ok(script, tmp_path)
    assert not (tmp_path / "dry").exists(), "--dry-run must not write anything"


def test_dry_run_renders_gpu_variants(capsys, tmp_path):
    path = experiment(tmp_path, tmp_path / "corpus", name="gpu")
    single = _dry_run(capsys, path, "--gpus-per-node", "4", "train.accelerator=gpu", "train.strategy=deepspeed")
    assert "#SBATCH --gpus-per-node=4" in single and "#SBATCH --ntasks-per-node=4" in single
    assert "#SBATCH --nodes=1" in single and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in single
    assert "NCCL_SOCKET_IFNAME" not in single
    multi = _dry_run(
        capsys, path, "--nodes", "2", "--gpus-per-node", "8", "--time", "12:00:00", "train.accelerator=auto"
    )
    for option in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=12:00:00"]:
        assert f"#SBATCH {option}" in multi.splitlines(), option
    assert "NCCL_SOCKET_IFNAME" in multi and "MASTER_ADDR=$(scontrol show hostnames" in multi
    _bash_syntax_ok(single, tmp_path)
    _bash_syntax_ok(multi, tmp_path)


def test_config_section_and_setup_lines(capsys, tmp_path):
    path = experiment(
        tmp_path,
        tmp_path / "corpus",
        name="cfg",
        slurm={
            "time": "45",
            "mem": "8G",
            "signal_grace_s": 60,
            "extra_sbatch": ["--qos=high"],
            "setup": ["module load cuda/12.4", "echo setup-done"],
            "job_name": "my-run",
        },
    )
    script = _dry_run(capsys, path)
    for option in ["--time=45", "--mem=8G", "--qos=high", "--signal=B:USR1@60", "--job-name=my-run"]:
        assert f"#SBATCH {option}" in script.splitlines(), option
    assert script.index("module load cuda/12.4") < script.index("srun --kill-on-bad-exit")
    # command-line flags win over the config
    assert "#SBATCH --time=2:00:00" in _dry_run(capsys, path, "--time", "2:00:00")


def test_the_shipped_slurm_experiment_renders(capsys):
    code, out, err = lm(capsys, "submit", "slurm-tiny", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --job-name=slurm-tiny" in out and "resume=auto" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--time", "1:2:3:4"], "--time/slurm.time: invalid SLURM time limit '1:2:3:4'"),
        (["slurm.time=25:61:00"], "--time/slurm.time: invalid SLURM time limit '25:61:00'"),
        (
            ["--gpus-per-node", "2", "train.accelerator=cpu"],
            "--gpus-per-node/slurm.gpus_per_node=2 asks for GPUs but train.accelerator=cpu",
        ),
        (["train.accelerator=gpu"], "train.accelerator=gpu needs GPUs: pass --gpus-per-node"),
        (
            ["--gpus-per-node", "4", "train.devices=2", "train.accelerator=gpu"],
            "train.devices=2 disagrees with --gpus-per-node",
        ),
        (["--nodes", "0"], "--nodes/slurm.nodes: must be >= 1, got 0"),
        (["--cpus-per-task", "0"], "--cpus-per-task/slurm.cpus_per_task: must be >= 1"),
        (["--time", "1"], "slurm.signal_grace_s (120) must be shorter than the time limit"),
        (["--partition", "a b"], "--partition/slurm.partition: 'a b' is not a valid SLURM name"),
        (["slurm.mem=lots"], "slurm.mem: 'lots' is not a SLURM memory size"),
        (["slurm.extra_sbatch=[qos]"], "slurm.extra_sbatch: 'qos' is not an sbatch option"),
        (["resume=/some/ckpt"], "lm submit always trains with resume=auto"),
        (["slurm.tiem=5"], "unknown key 'slurm.tiem'"),
    ],
)
def test_bad_input_is_one_line_error(capsys, tmp_path, args, needle):
    path = experiment(tmp_path, tmp_path / "corpus", name="bad")
    code, out, err = lm(capsys, "submit", str(path), "--dry-run", *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "bad").exists()


def test_no_sbatch_on_path_suggests_dry_run(capsys, tmp_path, monkeypatch):
    path = experiment(tmp_path, tmp_path / "corpus", name="nosbatch")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    code, out, err = lm(capsys, "submit", str(path), env_path=str(empty), monkeypatch=monkeypatch)
    assert code == 2
    line = err.strip()
    assert line.startswith("error: sbatch not found on PATH") and "--dry-run" in line and "\n" not in line
    assert not (tmp_path / "nosbatch").exists(), "nothing is written when sbatch is missing"


def test_sbatch_failure_is_reported(capsys, tmp_path, monkeypatch):
    """A fake sbatch that rejects the job: its last line becomes the error; nothing is recorded."""
    path = experiment(tmp_path, tmp_path / "corpus", name="rejected")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    code, out, err = lm(
        capsys, "submit", str(path), env_path=f"{bin_dir}:{os.environ['PATH']}", monkeypatch=monkeypatch
    )
    assert code == 2 and "sbatch failed (1): sbatch: error: invalid partition specified: nope" in err
    assert not (tmp_path / "rejected" / "slurm" / "jobs.jsonl").exists()


def test_submit_records_job_with_fake_sbatch(capsys, tmp_path, monkeypatch):
    """The files lm submit writes, with an sbatch that only records its arguments."""
    path = experiment(tmp_path, tmp_path / "corpus", name="recorded")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch-args\necho '4242;ci'\n")
    fake.chmod(0o755)
    code, out, err = lm(
        capsys, "submit", str(path), "--time", "20", env_path=f"{bin_dir}:{os.environ['PATH']}", monkeypatch=monkeypatch
    )
    assert code == 0, err
    run = tmp_path / "recorded"
    script = run / "slurm" / "job.sbatch"
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    assert "#SBATCH --time=20" in script.read_text() and os.access(script, os.X_OK)
    record = json.loads((run / "slurm" / "jobs.jsonl").read_text())
    assert record["job_id"] == "4242" and record["script"] == str(script)
    assert record["log"] == str(run / "slurm" / "job-4242.out")
    from lm.config import load_experiment

    snapshot = load_experiment(str(run / "slurm" / "experiment.yaml"))
    assert snapshot.run_dir == str(run) and snapshot.slurm.time == "20"
    assert "submitted job 4242" in out
    # lm status with no SLURM commands on PATH: the job is unknown, the rest is still reported
    code, out, err = lm(capsys, "status", str(run), env_path=str(tmp_path / "empty"), monkeypatch=monkeypatch)
    assert code == 0, err
    assert "job:             4242" in out and "UNKNOWN (none)" in out and "last checkpoint: none" in out


def test_status_of_a_missing_run_dir(capsys, tmp_path):
    code, out, err = lm(capsys, "status", str(tmp_path / "nope"))
    assert code == 2 and "run directory not found" in err


def test_unknown_template_placeholder(tmp_path):
    from lm.slurm.render import fill

    with pytest.raises(LMError) as e:
        fill("#SBATCH --time={{ time }}\n{{ tiem }}", {"time": "5"}, "custom.sbatch")
    assert "custom.sbatch: unknown placeholder {{ tiem }}" in str(e.value)
    assert fill("a {{time}} ${HOME} %j", {"time": "5"}, "t") == "a 5 ${HOME} %j"


def test_usr1_before_training_is_remembered_under_slurm(monkeypatch):
    """Under SLURM the USR1 handler exists from the moment StopRequest is made (before fit): an
    early USR1 sets the flag instead of killing the rank, and Lightning keeps out (it only adds
    its own in-handler checkpoint + requeue where no handler exists)."""
    from lm.training.signals import StopRequest

    monkeypatch.setenv("SLURM_JOB_ID", "123")
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1" and stop.wants_requeue and stop.agreed()
        from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

        assert _SignalConnector._has_already_handler(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_cluster_script_refuses_without_root(tmp_path):
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to run the script as another user")
    proc = subprocess.run(
        ["runuser", "-u", "nobody", "--", "bash", str(CLUSTER_SH)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3 and "cannot install SLURM here: not root" in proc.stdout


@pytest.mark.slow
def test_failed_requeue_is_an_error_not_a_clean_exit(tmp_path, tiny_data):
    """In a job (SLURM_JOB_ID set) USR1 stops training with a checkpoint; if `scontrol requeue`
    then fails, lm train exits 2 naming it, so SLURM never records the unfinished job COMPLETED."""
    import time

    from lm.training.checkpoint import latest_complete, read_manifest
    from tests.helpers import REPO, lm_command, lm_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(
        f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol-args\necho 'slurm_requeue error: denied' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    path = experiment(
        tmp_path,
        tiny_data,
        name="norequeue",
        train={"max_steps": 100_000, "record_samples": True},
        checkpoint={"every_n_steps": 100_000},
    )
    env = {**lm_env(), "SLURM_JOB_ID": "999999", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(
        lm_command("train", str(path)), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )
    samples = tmp_path / "norequeue" / "samples" / "rank00000.jsonl"
    try:
        deadline = time.time() + 300
        while not (samples.is_file() and len(samples.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(120) == 2
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "log.txt").read_text()
    assert "error: stopped by SIGUSR1 at step" in output and "`scontrol requeue` failed" in output
    assert (tmp_path / "scontrol-args").read_text().split() == ["requeue", "999999"]
    stopped = read_manifest(latest_complete(tmp_path / "norequeue" / "checkpoints"))["step"]
    assert 3 <= stopped < 100_000
