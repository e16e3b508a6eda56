"""The run directory's contract, from a table: what each command does in each state (``rundir.decide``).

The states are those of docs/reliability.md: fresh, finished (or stopped: the same for the decision),
finished with another config, a run whose checkpoints all fail, one with only best.pt left, a
checkpoint store that is not there, and a checkpoint whose own stored config differs. A run
moved aside by an interrupted --overwrite is put back before deciding (tests/test_rundir_round2.py),
and a running one is refused by its lock before deciding (tests/test_rundir.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from largebatch.rundir import Seen, decide

D = Path("/runs/a")
NEWEST = D / "checkpoints" / "step_00000008.pt"
BEST = D / "checkpoints" / "best.pt"
OTHER = Path("/runs/b/checkpoints/step_00000004.pt")

STATES = {
    "fresh": Seen(D),
    "finished": Seen(D, holds_run=True, config_diffs=(), newest=NEWEST),
    "another config": Seen(D, holds_run=True, config_diffs=("optim.lr",), newest=NEWEST),
    "checkpoint of another config": Seen(D, holds_run=True, config_diffs=(), newest=NEWEST, newest_diffs=("optim.lr",)),
    "no usable checkpoint": Seen(D, holds_run=True, config_diffs=(), unusable=3),
    "only best.pt usable": Seen(D, holds_run=True, config_diffs=(), unusable=3, best=BEST),
    "config only (killed before its first checkpoint)": Seen(D, holds_run=True, config_diffs=()),
    "store missing": Seen(D, holds_run=True, config_diffs=(), store_problem="checkpoint store ... nothing was changed"),
}

# command -> state -> (action, clear) or "refuse: WORDS" (words the one line must hold)
CONTRACT: dict[tuple[str | None, bool], dict[str, object]] = {
    (None, False): {
        "fresh": ("fresh", False), "finished": "refuse: already holds a run",
        "another config": "refuse: already holds a run", "checkpoint of another config": "refuse: already holds a run",
        "no usable checkpoint": "refuse: already holds a run", "only best.pt usable": "refuse: already holds a run",
        "config only (killed before its first checkpoint)": "refuse: already holds a run",
        "store missing": "refuse: checkpoint store",
    },
    (None, True): {
        "fresh": ("fresh", False), "finished": ("fresh", True), "another config": ("fresh", True),
        "checkpoint of another config": ("fresh", True), "no usable checkpoint": ("fresh", True),
        "only best.pt usable": ("fresh", True), "config only (killed before its first checkpoint)": ("fresh", True),
        "store missing": "refuse: checkpoint store",
    },
    ("auto", False): {
        "fresh": ("fresh", False), "finished": ("resume", False),
        "another config": "refuse: config differs in optim.lr",
        "checkpoint of another config": "refuse: written with a config that differs in optim.lr",
        "no usable checkpoint": "refuse: none of its 3 checkpoint(s) can be used",
        "only best.pt usable": f"refuse: continue from it with --resume {BEST}",
        "config only (killed before its first checkpoint)": ("fresh", True),
        "store missing": "refuse: checkpoint store",
    },
    ("auto", True): {
        "fresh": ("fresh", False), "finished": ("resume", False), "another config": ("fresh", True),
        "checkpoint of another config": ("fresh", True), "no usable checkpoint": ("fresh", True),
        "only best.pt usable": ("fresh", True), "config only (killed before its first checkpoint)": ("fresh", True),
        "store missing": "refuse: checkpoint store",
    },
}


@pytest.mark.parametrize("command", list(CONTRACT), ids=lambda c: f"resume={c[0]},overwrite={c[1]}")
def test_each_command_in_each_state_does_what_the_contract_says(command):
    resume, overwrite = command
    assert set(CONTRACT[command]) == set(STATES)
    for state, expected in CONTRACT[command].items():
        decision = decide(resume, overwrite, STATES[state])
        if isinstance(expected, str):
            assert decision.action == "refuse", state
            assert expected.removeprefix("refuse: ") in decision.message, (state, decision.message)
        else:
            assert (decision.action, decision.clear) == expected, state
            if decision.action == "resume":
                assert decision.checkpoint == NEWEST


def target(inside: bool, **fields) -> Seen:
    path = NEWEST if inside else OTHER
    return Seen(D, target=path, target_inside=inside, **fields)


@pytest.mark.parametrize(("seen", "resume", "overwrite", "expected"), [
    (Seen(D), str(OTHER), False, "refuse: no such checkpoint"),  # PATH not there
    (target(True, holds_run=True, config_diffs=()), str(NEWEST), False, ("resume", False)),
    (target(True, holds_run=True, config_diffs=("epochs",)), str(NEWEST), False, "refuse: config differs in epochs"),
    (target(True, holds_run=True, config_diffs=(), target_diffs=("epochs",)), str(NEWEST), False,
     "refuse: written with a config that differs in epochs"),
    (target(False), str(OTHER), False, ("fork", False)),
    (target(False, source_diffs=("optim.lr",)), str(OTHER), False, "refuse: config differs in optim.lr"),
    (target(False, target_diffs=("optim.lr",)), str(OTHER), False, "refuse: give the config it was written with"),
    (target(False, holds_run=True), str(OTHER), False, "refuse: choose a new --out"),
    (target(False, holds_run=True), str(OTHER), True, ("fork", True)),
    (target(False, store_problem="checkpoint store X"), str(OTHER), True, "refuse: checkpoint store X"),
], ids=["missing", "inside", "inside, other config", "inside, checkpoint of other config", "fork",
        "fork, source of other config", "fork, checkpoint of other config", "fork into a run", "fork over a run",
        "fork, store missing"])
def test_resume_from_a_path_resumes_forks_or_refuses_as_the_contract_says(seen, resume, overwrite, expected):
    decision = decide(resume, overwrite, seen)
    if isinstance(expected, str):
        assert decision.action == "refuse" and expected.removeprefix("refuse: ") in decision.message
    else:
        assert (decision.action, decision.clear) == expected
        assert decision.checkpoint == Path(resume)


def test_resumable_changes_are_announced_and_a_fork_says_what_it_continues():
    seen = Seen(D, holds_run=True, config_diffs=(), newest=NEWEST, changes=("log_every 1 -> 2",))
    assert decide("auto", False, seen).notices == ("resuming with changed settings: log_every 1 -> 2",)
    fork = decide(str(OTHER), False, target(False))
    assert fork.notices == (f"forking the run: continuing {OTHER} in {D}",)
