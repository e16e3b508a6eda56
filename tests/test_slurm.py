"""Slurm: the launcher read from srun's environment, and a real one-node Slurm cluster (tests/slurm_cluster.py)
running the sbatch example through pre-emption, requeue, cancellation and a time limit.

Every run must end bit-identical to the same run left alone. The runs wait at an exact step for the
test's signal (``LARGEBATCH_PAUSE``), so where a stop lands never depends on timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from support.checkpoints import newest, same_weights, weights
from support.runs import cli_args, cli_env, command, run_process, tiny_config

from largebatch import checkpoint as ckpt
from largebatch.distributed import LaunchError, detect_launch, first_host, slurm_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
ENV = cli_env(PYTHONPATH=str(ROOT / "src"), LARGEBATCH_PYTHON=sys.executable)

# ---- the launcher, from the environment srun gives each task -------------------------------------

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_srun_environment_gives_rank_world_and_a_rendezvous_every_task_derives_alike():
    launch = detect_launch(STEP)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (
        "slurm", 1, 4, 1, 2)
    assert (launch.master_addr, launch.master_port) == ("gpu07", slurm_port("4242"))
    assert detect_launch(dict(STEP, SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NODEID="1")).master_port == \
        launch.master_port
    assert "job 4242" in launch.describe() and "gpu07" in launch.describe()
    # torchrun's variables win (srun torchrun: one task per node), and so does an explicit MASTER_ADDR
    under_torchrun = dict(STEP, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", TORCHELASTIC_RUN_ID="x",
                          MASTER_ADDR="h", MASTER_PORT="29500")
    assert (detect_launch(under_torchrun).launcher, detect_launch(under_torchrun).rank) == ("torchrun", 5)
    assert detect_launch(dict(STEP, MASTER_ADDR="10.0.0.9")).master_addr == "10.0.0.9"
    assert detect_launch({}).launcher == "single process"


@pytest.mark.parametrize(("change", "message"), [
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "no rendezvous host"),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"},
     "this job step has 1 task(s) but Slurm job 4242 has 4"),
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside the job step's 4 task(s)"),
    ({"SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not an integer"),
    ({"SLURM_STEP_ID": None}, "Slurm job 4242 has 4 tasks but this process was not started by srun"),
    ({"SLURM_STEP_NODELIST": "gpu[07-08"}, "cannot read the Slurm node list 'gpu[07-08'"),
])
def test_an_inconsistent_srun_environment_is_one_line(change, message):
    env = {k: v for k, v in {**STEP, **change}.items() if v is not None}
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        detect_launch(env)


def test_bad_srun_environment_through_the_command_line_exits_2_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    env = {**ENV, **{k: v for k, v in STEP.items() if "NODELIST" not in k}}
    done = run_process(cli_args(tiny_config(run, checkpoint_every=2)), env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["largebatch: error: no rendezvous host: neither SLURM_STEP_NODELIST "
                                                "nor SLURM_JOB_NODELIST nor MASTER_ADDR is set"]
    assert not run.exists()


def test_the_sbatch_example_refuses_a_missing_config_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(TRAIN_SBATCH), str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")],
                          env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"largebatch: error: train.sbatch: no config file '{tmp_path / 'nope.yaml'}'; usage: sbatch train.sbatch "
        "CONFIG [train options...]"]
    assert list(tmp_path.iterdir()) == []


# ---- a real cluster -------------------------------------------------------------------------------

pytestmark_real = pytest.mark.skipif(slurm_cluster.missing() is not None, reason=str(slurm_cluster.missing()))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


SPARSE = {"epochs": 3, "log_every": 1000, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run_process(cli_args(tiny_config(out, **SPARSE)), env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def submit(slurm, tmp_path: Path, run: Path, *sbatch_args: str, pause: str = "") -> str:
    config = tmp_path / "config.yaml"
    config.write_text(f"out: {run}\n")
    args = cli_args(tiny_config(run, **SPARSE))[1:]  # the --set options: train.sbatch gives "train" itself
    done = slurm.run("sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path / 'job.out'}",
                     *sbatch_args, str(TRAIN_SBATCH), str(config), *args,
                     env={**ENV, "LARGEBATCH_PAUSE": pause})
    return done.stdout.strip().split(";")[0]


def wait_for(path: Path, slurm, job: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} never reached its pause: {slurm.job_field(job, 'JobState')}")
        time.sleep(0.1)


def finish(slurm, job: str, timeout: float = 240) -> str:
    return slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=timeout)


@pytest.mark.slow
@pytestmark_real
def test_the_warning_signal_checkpoints_requeues_and_the_job_ends_bit_identical(tmp_path, slurm, straight):
    run, marker = tmp_path / "run", tmp_path / "paused"
    job = submit(slurm, tmp_path, run, pause=f"step:5:0:{marker}")
    wait_for(marker, slurm, job)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@N sends before the time limit
    assert finish(slurm, job) == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    assert slurm.job_field(job, "Restarts") == "1"
    log = (tmp_path / "job.out").read_text()
    assert "stopped by SIGUSR1 (the scheduler's warning); checkpoint written at step 5" in log
    assert f"resumed from {run / 'checkpoints' / 'step_00000005.pt'} at step 5" in log
    assert same_weights(weights(newest(run)), weights(newest(straight)))


@pytest.mark.slow
@pytestmark_real
def test_scancel_checkpoints_and_a_resubmission_continues_exactly(tmp_path, slurm, straight):
    run, marker = tmp_path / "run", tmp_path / "paused"
    job = submit(slurm, tmp_path, run, pause=f"step:6:0:{marker}")
    wait_for(marker, slurm, job)
    slurm.run("scancel", job)
    assert finish(slurm, job) == "CANCELLED"
    assert "stopped by SIGTERM; checkpoint written at step 6" in (tmp_path / "job.out").read_text()
    assert ckpt.load_checkpoint(newest(run))["step"] == 6
    again = submit(slurm, tmp_path, run, pause=f"step:6:0:{marker}")  # the marker exists: no pause this time
    assert finish(slurm, again) == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    assert same_weights(weights(newest(run)), weights(newest(straight)))


@pytest.mark.slow
@pytestmark_real
def test_scontrol_requeue_during_a_checkpoint_write_continues_exactly(tmp_path, slurm, straight):
    run, marker = tmp_path / "run", tmp_path / "paused"
    job = submit(slurm, tmp_path, run, pause=f"checkpoint:8:0:{marker}")  # step 8's file on disk, not yet renamed
    wait_for(marker, slurm, job)
    slurm.run("scontrol", "requeue", job)
    assert finish(slurm, job) == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    assert slurm.job_field(job, "Restarts") == "1"
    # the requeue's SIGTERM came after step 8's stop check: step 8's file is completed, and the stop lands
    # at the next step boundary
    assert "stopped by SIGTERM; checkpoint written at step 9" in (tmp_path / "job.out").read_text()
    assert same_weights(weights(newest(run)), weights(newest(straight)))


@pytest.mark.slow
@pytestmark_real
def test_two_srun_tasks_train_exactly_as_two_torchrun_processes(tmp_path, slurm):
    pairs = dict(tiny_config(tmp_path / "srun", checkpoint_every=2), micro_batch=64)
    done = slurm.run("srun", "--ntasks=2", *command(cli_args(pairs)), env=ENV, timeout=300)
    assert "launcher: slurm (job" in done.stdout and ", 2 task(s), rendezvous " in done.stdout
    ref = run_process(cli_args(dict(pairs, out=str(tmp_path / "torchrun"))), torchrun=True, env=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert same_weights(weights(newest(tmp_path / "srun")), weights(newest(tmp_path / "torchrun")))
    # the node list parser agrees with Slurm's own expansion
    nodes = slurm.run("scontrol", "show", "hostnames", "gpu[07-09,12],cpu3").stdout.split()
    assert first_host("gpu[07-09,12],cpu3") == nodes[0] == "gpu07"


@pytest.mark.slow
@pytestmark_real
def test_srun_with_a_task_count_that_does_not_split_the_batch_is_refused(tmp_path, slurm):
    run = tmp_path / "run"
    done = slurm.run("srun", "--ntasks=2", *command(cli_args(tiny_config(run, checkpoint_every=2, batch_size=127))),
                     env=ENV, check=False)
    assert done.returncode == 2
    # rank 0 says it once, with sizes that would divide; the other task exits silently
    lines = [line for line in done.stderr.splitlines() if line.startswith("largebatch:")]
    assert lines == ["largebatch: error: batch_size 127 is not divisible by world size 2; "
                     "choose a batch_size that is a multiple of 2 (e.g. 126 or 128)"]
    assert not run.exists()


@pytest.mark.slow
@pytestmark_real
def test_a_job_reaching_its_time_limit_is_warned_checkpoints_requeues_and_ends_bit_identical(tmp_path, slurm, straight):
    """A 1-minute limit with the warning 55 s ahead: Slurm sends it within the minute (its timer has a
    resolution of up to a minute); a run that reaches step 5 waits there for it. On a loaded machine the
    warning may come sooner (at step 1), and the requeued job, which keeps the limit, may be warned again:
    every warning must be one checkpoint, one requeue and one exact resume, and some run stops at step 5."""
    run, marker = tmp_path / "run", tmp_path / "paused"
    job = submit(slurm, tmp_path, run, "--time=1", "--signal=B:USR1@55", pause=f"step:5:0:{marker}")
    assert finish(slurm, job, timeout=400) == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    log = (tmp_path / "job.out").read_text()
    stops = re.findall(r"stopped by SIGUSR1 \(the scheduler's warning\); checkpoint written at step (\d+)", log)
    resumes = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert "5" in stops and resumes == stops, log[-3000:]
    assert [int(step) for step in stops] == sorted(int(step) for step in stops), log[-3000:]
    assert slurm.job_field(job, "Restarts") == str(len(stops))
    assert same_weights(weights(newest(run)), weights(newest(straight)))
