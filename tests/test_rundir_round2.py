"""The run directory under kills, moves, symlinks and tampering (issue 23): nothing lost, nothing mixed.

A kill is reproduced by leaving the directory exactly as the kill leaves it (the operating system
drops the lock of a dead process), so every case is deterministic.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from support.checkpoints import newest, same_weights, weights
from support.runs import cli_args, config_of, finished_run, run_cli, snapshot, tiny_config

from largebatch import checkpoint as ckpt
from largebatch import metrics
from largebatch.rundir import REPLACED, RunDir, RunDirError
from largebatch.trainer import Trainer


def train_rows(path: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def csv_train_rows(path: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(io.StringIO(path.read_text())) if r["kind"] == "train"]


def back_to_step_4(run: Path) -> None:
    """As after a crash at step 5: the checkpoints of steps 6 and 8 never existed."""
    for path in ckpt.step_checkpoints(run / "checkpoints")[2:]:
        path.unlink()
        path.with_suffix(".pt.sha256").unlink()


def killed_overwrite(run: Path, pairs: dict[str, object]) -> None:
    """The directory as an ``--overwrite`` killed before its first step leaves it: the old run in
    .replaced/, the new run's config.yaml and empty checkpoints/ in place, the lock released."""
    trainer = Trainer(config_of(pairs), overwrite=True)
    trainer.run_dir_lifecycle._lock.release()  # what the kernel does for a killed process
    del trainer


# ---- 1: an --overwrite killed before its first step -----------------------------------------------


def test_a_run_moved_aside_by_a_killed_overwrite_is_put_back_and_never_deleted(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    before = snapshot(run)
    other = dict(pairs, **{"optim.lr": 3.0})
    killed_overwrite(run, other)
    assert (run / REPLACED / "checkpoints").is_dir()  # the state the kill leaves
    capsys.readouterr()
    # the natural next command, with the other config: refused for what it is, the old run back in place
    code, line, out = run_cli([*cli_args(other), "--resume", "auto"], capsys)
    assert f"put back the run that an interrupted --overwrite had moved aside into {run / REPLACED}" in out
    assert code == 2 and line == (f"largebatch: error: cannot resume {run}: the config differs in optim.lr; "
                                  "use a new --out or --overwrite")
    assert snapshot(run) == before and not (run / REPLACED).exists()
    # killed again, and then resumed with the old config: it continues from step 4, bit-identical
    killed_overwrite(run, other)
    code, _, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0 and "put back the run" in out and "step_00000004.pt at step 4" in out
    assert same_weights(weights(newest(run)), weights(newest(straight)))
    assert train_rows(run / "metrics.jsonl") == list(range(1, 9))


def test_a_kill_in_the_middle_of_moving_the_old_run_aside_is_put_back_too(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    before = snapshot(run)
    (run / REPLACED).mkdir()
    for name in ("metrics.jsonl", "metrics.csv"):  # moved; checkpoints/ and config.yaml not yet
        os.replace(run / name, run / REPLACED / name)
    code, line, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0 and "put back the run" in out, line
    assert snapshot(run)["metrics.jsonl"] == before["metrics.jsonl"]


def test_a_put_aside_run_beside_a_run_with_checkpoints_is_refused_untouched(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    shutil.copytree(run, tmp_path / "copy")
    shutil.move(tmp_path / "copy", run / REPLACED)
    before = snapshot(run)
    code, line, _ = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 2 and line.startswith(f"largebatch: error: run directory {run} holds a run, and in "
                                         f"{run / REPLACED} the run an interrupted --overwrite moved aside; keep one")
    assert snapshot(run) == before


# ---- 2: one protected scope from opening the directory to its cleanup --------------------------------


def test_a_closed_stdout_never_stops_a_run(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "stdout", None)  # as `largebatch train ... >&-`
    code, line, _ = run_cli(cli_args(tiny_config(run, checkpoint_every=2, progress=True)), capsys)
    assert code == 0, line
    assert ckpt.load_checkpoint(newest(run))["step"] == 8


def test_an_interrupt_between_opening_and_the_loop_takes_away_what_the_run_created(tmp_path, capsys, monkeypatch):
    run, pairs = finished_run(tmp_path, "run")
    before = snapshot(run)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_announce", interrupted)  # Ctrl-C as the run starts
    code, line, _ = run_cli([*cli_args(pairs), "--overwrite"], capsys)
    assert code == 130 and line == "largebatch: error: interrupted"
    assert snapshot(run) == before and not (run / REPLACED).exists()
    fresh = tmp_path / "fresh"
    assert run_cli(cli_args(dict(pairs, out=str(fresh))), capsys)[0] == 130
    assert not fresh.exists()


# ---- 3, 4, 6: metrics are cut, never rewritten, never emptied -----------------------------------------


class _OpenedForRewrite:
    """Records every open of a run record that would empty it (mode 'w', O_TRUNC): a kill there loses rows."""

    active = False
    seen: ClassVar[list[str]] = []

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not cls.active or event != "open" or not str(args[0]).endswith(("metrics.jsonl", "metrics.csv")):
            return
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and "w" in mode) or (isinstance(flags, int) and flags & os.O_TRUNC):
            cls.seen.append(str(args[0]))


sys.addaudithook(_OpenedForRewrite.hook)


def test_a_resume_cuts_the_records_without_ever_emptying_them(tmp_path, capsys):
    straight, pairs = finished_run(tmp_path, "straight", log_every=1)
    run, pairs = finished_run(tmp_path, "run", log_every=1)
    back_to_step_4(run)
    kept = b"".join(run.joinpath("metrics.jsonl").read_bytes().splitlines(keepends=True)[:5])  # 4 train, 1 eval
    _OpenedForRewrite.active, _OpenedForRewrite.seen = True, []
    try:
        assert run_cli([*cli_args(pairs), "--resume", "auto"], capsys)[0] == 0
    finally:
        _OpenedForRewrite.active = False
    assert _OpenedForRewrite.seen == []
    assert (run / "metrics.jsonl").read_bytes().startswith(kept)
    assert train_rows(run / "metrics.jsonl") == list(range(1, 9))
    assert csv_train_rows(run / "metrics.csv") == list(range(1, 9))
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_fresh_run_never_empties_records_it_finds_even_through_a_symlink(tmp_path, capsys):
    other, _ = finished_run(tmp_path, "other")
    before = snapshot(other)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(other / "metrics.jsonl")
    code, line, _ = run_cli(cli_args(tiny_config(run, checkpoint_every=2)), capsys)
    assert code == 2 and line == (f"largebatch: error: run directory {run} already holds a run; pass --resume auto "
                                  "to continue it or --overwrite to replace it")
    assert snapshot(other) == before
    # replacing it moves the link aside and deletes the link, never the rows it points to
    assert run_cli([*cli_args(tiny_config(run, checkpoint_every=2)), "--overwrite"], capsys)[0] == 0
    assert snapshot(other) == before and not (run / "metrics.jsonl").is_symlink()


def test_a_deleted_metrics_jsonl_leaves_metrics_csv_its_rows(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    (run / "metrics.jsonl").unlink()
    code, _, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0 and f"{run / 'metrics.jsonl'} is missing" in out
    assert csv_train_rows(run / "metrics.csv") == list(range(1, 9))
    assert train_rows(run / "metrics.jsonl") == list(range(5, 9))


def test_a_resume_onto_an_emptied_metrics_jsonl_says_so(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    (run / "metrics.jsonl").write_text("")  # as a kill in the middle of an older version's rewrite left it
    code, _, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0
    assert f"{run / 'metrics.jsonl'} is empty: its rows up to step 4 are lost (metrics.csv keeps its own)" in out


# ---- 5: a checkpoint store that is not there ------------------------------------------------------


@pytest.mark.parametrize("store", ["dangling symlink", "file"])
def test_a_missing_checkpoint_store_stops_in_one_line_and_touches_nothing(tmp_path, capsys, store):
    run, pairs = finished_run(tmp_path, "run")
    shutil.move(run / "checkpoints", tmp_path / "scratch")
    if store == "file":
        (run / "checkpoints").write_text("not a directory")
    else:
        (run / "checkpoints").symlink_to(tmp_path / "unmounted" / "checkpoints")
    before = snapshot(run)
    for extra in (["--resume", "auto"], ["--resume", "auto", "--overwrite"], ["--overwrite"]):
        code, line, _ = run_cli([*cli_args(pairs), *extra], capsys)
        assert code == 2 and line.startswith(f"largebatch: error: checkpoint store {run / 'checkpoints'} ")
        assert line.endswith("nothing was changed")
        assert snapshot(run) == before and (run / "checkpoints").is_symlink() == (store != "file")


# ---- 7 (and issue 21 item 8): the checkpoint's own config and format -----------------------------------


def copy_checkpoint(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    shutil.copyfile(source.with_suffix(".pt.sha256"), target.with_suffix(".pt.sha256"))


def test_a_checkpoint_written_with_another_config_is_refused_in_one_line(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    other, _ = finished_run(tmp_path, "other", **{"optim.lr": 3.0})
    back_to_step_4(run)
    copy_checkpoint(ckpt.step_path(other / "checkpoints", 6), ckpt.step_path(run / "checkpoints", 6))
    before = snapshot(run)
    code, line, _ = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 2 and line == (f"largebatch: error: cannot resume {run}: its checkpoint step_00000006.pt was "
                                  "written with a config that differs in optim.lr; use a new --out or --overwrite")
    assert snapshot(run) == before
    # config.yaml edited to another config, and that config given: the checkpoints still know theirs
    ckpt.step_path(run / "checkpoints", 6).unlink()
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 2.0", "lr: 3.0"))
    code, line, _ = run_cli([*cli_args(dict(pairs, **{"optim.lr": 3.0})), "--resume", "auto"], capsys)
    assert code == 2 and line == (f"largebatch: error: cannot resume {run}: its checkpoint step_00000004.pt was "
                                  "written with a config that differs in optim.lr; use a new --out or --overwrite")
    # config.yaml deleted, and another config given
    (run / "config.yaml").unlink()
    code, line, _ = run_cli([*cli_args(dict(pairs, **{"optim.lr": 3.0})), "--resume", "auto"], capsys)
    assert code == 2 and "written with a config that differs in optim.lr" in line
    # a loose checkpoint forked with another config
    loose = tmp_path / "loose.pt"
    copy_checkpoint(ckpt.step_path(other / "checkpoints", 4), loose)
    code, line, _ = run_cli([*cli_args(dict(pairs, out=str(tmp_path / "fork"))), "--resume", str(loose)], capsys)
    assert code == 2 and line == (f"largebatch: error: cannot resume {loose}: it was written with a config that "
                                  "differs in optim.lr; give the config it was written with")
    assert not (tmp_path / "fork").exists()


def test_resumable_differences_from_the_checkpoints_config_go_on_with_a_notice(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    code, _, out = run_cli([*cli_args(dict(pairs, log_every=2)), "--resume", "auto"], capsys)
    assert code == 0 and "resuming with changed settings: log_every 1 -> 2" in out
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_changed_micro_batch_is_announced_and_changes_nothing_else(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    code, _, out = run_cli([*cli_args(dict(pairs, micro_batch=64)), "--resume", "auto"], capsys)
    assert code == 0
    assert "resuming a run of micro-batch 128 with 64: global batch kept at 128, accumulation now 2" in out
    assert "resuming with changed settings: micro_batch None -> 64" in out
    after = weights(newest(run))
    reference = weights(newest(straight))
    assert all(torch.allclose(after[k], reference[k], rtol=1e-4, atol=1e-6) for k in reference)


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    path = ckpt.save_checkpoint(tmp_path / "step_00000004.pt", {"format": ckpt.FORMAT + 1, "step": 4})
    with pytest.raises(ckpt.CheckpointError, match=f"is of format {ckpt.FORMAT + 1}, newer than this version"):
        ckpt.load_checkpoint(path)
    pairs = tiny_config(tmp_path / "run", checkpoint_every=2)
    code, line, _ = run_cli([*cli_args(pairs), "--resume", str(path)], capsys)
    assert code == 2 and line == (f"largebatch: error: checkpoint {path} is of format {ckpt.FORMAT + 1}, newer than "
                                  f"this version of largebatch reads (up to {ckpt.FORMAT}); resume it with the version "
                                  "that wrote it")


# ---- 8: a live run directory moved ----------------------------------------------------------------


def test_a_run_directory_moved_while_running_stops_with_a_checkpoint_where_it_now_is(tmp_path, capsys, monkeypatch):
    straight, pairs = finished_run(tmp_path, "straight")
    run, moved = tmp_path / "run", tmp_path / "moved"
    real_step = Trainer.train_step

    def step_then_move(self, micro):
        result = real_step(self, micro)
        if self.step == 2:  # during the update of step 3: `mv run moved`
            run.rename(moved)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_move)
    code, line, _ = run_cli(cli_args(dict(pairs, out=str(run))), capsys)
    assert code == 2 and line == (f"largebatch: error: run directory {run} was moved to {moved} while the run ran; "
                                  f"stopped at step 4 with its checkpoint there; continue with --out {moved} "
                                  "--resume auto")
    assert not run.exists()  # the old path is never re-created
    assert ckpt.load_checkpoint(newest(moved))["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert run_cli([*cli_args(dict(pairs, out=str(moved))), "--resume", "auto"], capsys)[0] == 0
    assert same_weights(weights(newest(moved)), weights(newest(straight)))
    assert train_rows(moved / "metrics.jsonl") == list(range(1, 9))


# ---- 9: threads on resume ---------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_resume_keeps_the_runs_thread_count_unless_the_config_sets_one(tmp_path, capsys, monkeypatch,
                                                                         restore_threads):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)  # the node the run started on
    straight, pairs = finished_run(tmp_path, "straight", threads=None)
    run, _ = finished_run(tmp_path, "run", threads=None)
    back_to_step_4(run)
    assert ckpt.load_checkpoint(newest(run))["threads"] == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # requeued onto another node
    code, _, out = run_cli([*cli_args(dict(pairs, out=str(run))), "--resume", "auto"], capsys)
    assert code == 0 and "keeping the run's 3 CPU thread(s) (this machine would use 1; set threads to change it)" in out
    assert torch.get_num_threads() == 3
    assert same_weights(weights(newest(run)), weights(newest(straight)))
    back_to_step_4(run)
    code, _, out = run_cli([*cli_args(dict(pairs, out=str(run), threads=1)), "--resume", "auto"], capsys)
    assert code == 0 and "resuming a run of 3 CPU thread(s) with 1" in out


# ---- 11-17: hangs, crashes and misleading messages ----------------------------------------------------


@pytest.mark.parametrize("which", ["checkpoint", "sidecar"])
def test_a_fifo_among_the_checkpoints_is_never_opened(tmp_path, which):
    directory = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(ckpt.step_path(directory, 2), {"step": 2})
    fifo = ckpt.step_path(directory, 4)
    if which == "checkpoint":
        os.mkfifo(fifo)
        fifo.with_suffix(".pt.sha256").write_text("0" * 64 + "\n")
    else:
        ckpt.save_checkpoint(fifo, {"step": 4})
        fifo.with_suffix(".pt.sha256").unlink()
        os.mkfifo(fifo.with_suffix(".pt.sha256"))
    found: list[Path | None] = []
    reader = threading.Thread(target=lambda: found.append(ckpt.newest_valid(directory, loadable=True)), daemon=True)
    reader.start()
    reader.join(timeout=60)  # a few milliseconds unless open() blocks
    if reader.is_alive():  # blocked in open(): give it a writer so that it can return, then fail
        target = fifo if which == "checkpoint" else fifo.with_suffix(".pt.sha256")
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=20)
        pytest.fail("opening a FIFO as a checkpoint blocked")
    assert found == [good]


def test_a_directory_named_like_a_checkpoint_is_neither_counted_nor_pruned(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    (run / "checkpoints" / "step_00000001.pt").mkdir()  # someone's directory, older than every checkpoint
    (run / "checkpoints" / "step_00000001.pt" / "notes").write_text("mine")
    code, line, _ = run_cli([*cli_args(dict(pairs, keep_checkpoints=2)), "--resume", "auto"], capsys)
    assert code == 0, line
    assert [p.name for p in ckpt.step_checkpoints(run / "checkpoints")] == ["step_00000006.pt", "step_00000008.pt"]
    assert (run / "checkpoints" / "step_00000001.pt" / "notes").read_text() == "mine"
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_plots_skip_a_metrics_row_without_a_kind(tmp_path):
    rows = [{"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5},
            {"kind": "eval", "step": 2, "eval_loss": 0.7, "top1": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = metrics.write_plots(tmp_path)
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png", "lr.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_only_best_pt_left_offers_to_continue_from_it(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    for path in ckpt.step_checkpoints(run / "checkpoints"):
        path.unlink()
    before = snapshot(run)
    best = run / "checkpoints" / "best.pt"
    code, line, _ = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 2 and line == (f"largebatch: error: run directory {run} holds a run but none of its step "
                                  f"checkpoints can be used; best.pt can: continue from it with --resume {best} "
                                  "(or fork it into a new --out), or pass --overwrite to start again from step 0")
    assert snapshot(run) == before
    code, line, out = run_cli([*cli_args(pairs), "--resume", str(best)], capsys)  # the advice works
    assert code == 0, line
    assert f"resumed from {best}" in out


def test_a_truncated_checkpoint_with_a_recomputed_digest_is_called_damaged(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "step_00000004.pt", {"w": torch.ones(1000)})
    data = path.read_bytes()[:2000]
    path.write_bytes(data)
    # the digest recomputed over the truncated bytes, as a careless copy tool would
    path.with_suffix(".pt.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load_checkpoint(path)
    assert str(caught.value).startswith(f"checkpoint {path} is damaged: it matches its {path.name}.sha256 but "
                                        "cannot be read (")


def test_a_renamed_checkpoint_resumes_at_the_step_it_holds_and_says_so(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    back_to_step_4(run)
    four = ckpt.step_path(run / "checkpoints", 4)
    four.rename(ckpt.step_path(run / "checkpoints", 6))
    four.with_suffix(".pt.sha256").rename(ckpt.step_path(run / "checkpoints", 6).with_suffix(".pt.sha256"))
    code, _, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0 and "checkpoint step_00000006.pt holds step 4, not 6 (renamed?); resuming at step 4" in out
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_fork_writes_its_own_best_pt(tmp_path, capsys):
    source, pairs = finished_run(tmp_path, "source")
    payload = ckpt.load_checkpoint(ckpt.step_path(source / "checkpoints", 4))
    payload["best_top1"] = 100.0  # the source's best score: unbeatable
    start = ckpt.save_checkpoint(tmp_path / "start" / "checkpoints" / "step_00000004.pt", payload)
    fork = tmp_path / "fork"
    code, line, _ = run_cli([*cli_args(dict(pairs, out=str(fork))), "--resume", str(start)], capsys)
    assert code == 0, line
    best = ckpt.load_checkpoint(fork / "checkpoints" / "best.pt")
    rows = [r for r in map(json.loads, (fork / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    assert best["best_top1"] == max(r["top1"] for r in rows)


# ---- 18: two starts at once on a directory that does not exist yet -----------------------------------


def test_the_loser_of_two_simultaneous_starts_never_removes_the_winners_directory(tmp_path, monkeypatch):
    run = tmp_path / "new" / "run"
    config = config_of(tiny_config(run, checkpoint_every=2))
    winner = RunDir(run, config, is_main=True, notice=lambda _: None)
    assert winner.open("auto", False) is None
    real_make_dir = RunDir._make_dir

    def saw_it_missing_too(self):  # both looked before either made it: each thinks it made the directory
        real_make_dir(self)
        self._created_root = tmp_path / "new"

    monkeypatch.setattr(RunDir, "_make_dir", saw_it_missing_too)
    loser = RunDir(run, config, is_main=True, notice=lambda _: None)
    with pytest.raises(RunDirError, match="is in use by process"):
        loser.open("auto", False)
    assert (run / "config.yaml").is_file() and (run / "checkpoints").is_dir()
    winner.close()
