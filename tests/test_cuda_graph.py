"""The CUDA-graph step: its logic through an eager stand-in (static buffers, warm-up that leaves no
trace, when it captures), the trainer's results with it, and the real capture where CUDA exists."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.checkpoints import final_weights, metric_rows
from support.runs import STATEFUL_RUN, StopsAtStep, config_of, run_cli, synthetic_args, tiny_config

from largebatch.config import ConfigError
from largebatch.cuda_graph import MAX_STATIC_INPUT_BYTES, EagerBackend, GraphedStep, graphs_decision
from largebatch.optim import LARS
from largebatch.trainer import Preempted, Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _decide(mode="auto", device=CUDA, distributed=False, fp16=False, optimizer="lars", input_bytes=1 << 20):
    return graphs_decision(mode, device=device, distributed=distributed, fp16=fp16, optimizer=optimizer,
                           input_bytes=input_bytes)


def test_auto_uses_graphs_only_where_they_are_correct():
    assert _decide() == (True, "on")
    assert _decide(optimizer="lamb")[0]
    assert not _decide(mode="off")[0]
    for blocked in (dict(device=CPU), dict(distributed=True), dict(fp16=True), dict(optimizer="sgd"),
                    dict(input_bytes=MAX_STATIC_INPUT_BYTES + 1)):
        use, why = _decide(**blocked)
        assert not use and why.startswith("off: "), blocked
    assert _decide(mode="on", input_bytes=MAX_STATIC_INPUT_BYTES + 1)[0]  # asked for: the user's memory


@pytest.mark.parametrize("blocked", [dict(device=CPU), dict(distributed=True), dict(fp16=True),
                                     dict(optimizer="sgd")])
def test_on_where_graphs_cannot_work_is_a_one_line_error(blocked):
    with pytest.raises(ConfigError, match=r"^cuda_graphs=on cannot be used: .*; set cuda_graphs=auto or off$"):
        _decide(mode="on", **blocked)


def _toy(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(5, 3))
    optimizer = LARS(model.parameters(), lr=torch.tensor(0.5), momentum=0.9, weight_decay=1e-3,
                     trust_coefficient=0.02)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(batches):
        seen.extend(batches)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            (loss / len(batches)).backward()
            total += loss.detach()
        optimizer.step()
        return total / len(batches), torch.ones((), dtype=torch.bool)

    def state():
        yield from model.parameters()
        yield from model.buffers()
        for s in optimizer.state.values():
            yield from (v for v in s.values() if isinstance(v, torch.Tensor))

    return model, optimizer, step, state, seen


def _batches(gen: torch.Generator, n: int = 2, size: int = 8):
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def _everything(model, optimizer) -> list[torch.Tensor]:
    return [t.clone() for t in (*model.state_dict().values(),
                                *(v for s in optimizer.state.values() for v in s.values()))]


def test_graphed_steps_equal_eager_steps_and_warm_up_leaves_no_trace(seed):
    gen = torch.Generator().manual_seed(seed)
    data = [_batches(gen) for _ in range(4)]
    eager_model, eager_opt, eager_step, _, _ = _toy(seed)
    model, opt, step, state, seen = _toy(seed)
    backend = EagerBackend()
    graphed = GraphedStep(step, state, backend=backend, warmup_steps=3)
    for i, batches in enumerate(data):
        torch.manual_seed(1000 + i)  # as the trainer reseeds dropout before each step
        want = eager_step(batches)[0]
        torch.manual_seed(1000 + i)
        got = graphed(batches)[0]
        assert torch.equal(got, want), i  # the loss of this step, not of a warm-up step
        assert all(torch.equal(a, b) for a, b in zip(_everything(model, opt), _everything(eager_model, eager_opt),
                                                   strict=True)), i
    # warm-up ran on the static buffers, the capture once, and every later step read those buffers
    assert backend.warmup_calls == 3 and backend.captures == 1
    static_ids = {id(t) for pair in graphed.static_inputs for t in pair}
    assert {id(t) for pair in seen for t in pair} == static_ids
    for (sx, sy), (x, y) in zip(graphed.static_inputs, data[-1], strict=True):
        assert torch.equal(sx, x) and torch.equal(sy, y)  # holding the latest step's inputs


def test_a_new_input_signature_captures_again(seed):
    gen = torch.Generator().manual_seed(seed)
    _, _, step, state, _ = _toy(seed)
    backend = EagerBackend()
    graphed = GraphedStep(step, state, backend=backend, warmup_steps=1)
    graphed(_batches(gen))
    graphed(_batches(gen))
    assert backend.captures == 1
    graphed(_batches(gen, size=4))  # a shorter micro-batch
    graphed(_batches(gen, n=3))  # more micro-batches
    assert backend.captures == 3 and graphed.captured


class _GraphedOnCPU(Trainer):
    """The trainer with its step behind GraphedStep, replayed by the eager stand-in."""

    def _make_step_fn(self):
        self.graphs_reason = "on (eager stand-in)"
        self.backend = EagerBackend()
        return GraphedStep(self._eager_step, self._step_state, backend=self.backend)


class _GraphedStopAt(StopsAtStep, _GraphedOnCPU):
    """The graphed stand-in, pre-empted once it reaches a given step."""


def test_graphed_trainer_run_and_resume_equal_the_eager_run(tmp_path):
    eager = Trainer(config_of(tiny_config(tmp_path / "eager", **STATEFUL_RUN))).run()
    graphed = _GraphedOnCPU(config_of(tiny_config(tmp_path / "graphed", **STATEFUL_RUN)))
    assert graphed.graphed
    graphed.run()
    assert graphed.backend.captures == 1
    _GraphedStopAt.stop_at = 3
    with pytest.raises(Preempted):
        _GraphedStopAt(config_of(tiny_config(tmp_path / "resumed", **STATEFUL_RUN))).run()
    resumed = _GraphedOnCPU(config_of(tiny_config(tmp_path / "resumed", **STATEFUL_RUN)), resume="auto").run()
    assert eager.steps == resumed.steps == 8
    reference = final_weights(tmp_path / "eager")
    for name in ("graphed", "resumed"):
        weights = final_weights(tmp_path / name)
        assert all(torch.equal(weights[k], reference[k]) for k in reference), name
        assert metric_rows(tmp_path / name) == metric_rows(tmp_path / "eager"), name


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_real_capture_matches_eager_on_cuda(tmp_path):
    options = {**STATEFUL_RUN, "model.name": "resnet_small", "model.options": {}, "data.augment": False,
               "device": "cuda", "precision": "fp32"}
    Trainer(config_of(tiny_config(tmp_path / "eager", **options, cuda_graphs="off"))).run()
    graphed = Trainer(config_of(tiny_config(tmp_path / "graphed", **options, cuda_graphs="on")))
    assert graphed.graphed
    graphed.run()
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "graphed")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


@needs_cuda
def test_cuda_auto_default_captures_a_small_batch_run(tmp_path):
    config = config_of(tiny_config(tmp_path / "auto", device="cuda"))
    trainer = Trainer(config)
    assert trainer.graphed and trainer.graphs_reason == "on"
    assert torch.backends.cudnn.benchmark  # fixed shapes: autotuned once
    assert trainer.run().steps == 8


class _FailingCapture(EagerBackend):
    def capture(self, fn):
        fn()  # a capture dies part-way, after running some of the step
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_under_auto_goes_on_eagerly_from_a_clean_state(seed):
    gen = torch.Generator().manual_seed(seed)
    data = [_batches(gen) for _ in range(3)]
    eager_model, eager_opt, eager_step, _, _ = _toy(seed)
    model, opt, step, state, _ = _toy(seed)
    told: list[str] = []
    graphed = GraphedStep(step, state, backend=_FailingCapture(), on_failure=told.append)
    for i, batches in enumerate(data):
        torch.manual_seed(i)
        want = eager_step(batches)[0]
        torch.manual_seed(i)
        assert torch.equal(graphed(batches)[0], want)
    assert told == ["operation not permitted when stream is capturing"] and not graphed.captured
    assert all(torch.equal(a, b) for a, b in zip(_everything(model, opt), _everything(eager_model, eager_opt),
                                               strict=True))
    _, _, other_step, other_state, _ = _toy(seed)
    strict = GraphedStep(other_step, other_state, backend=_FailingCapture())
    with pytest.raises(RuntimeError, match="not permitted"):  # cuda_graphs=on: the error stands
        strict(data[0])


def test_cuda_warm_up_runs_on_a_side_stream_ordered_both_ways(monkeypatch):
    from largebatch import cuda_graph

    events: list[str] = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    main, active = FakeStream("main"), []

    class FakeContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            active.append(self.stream.name)

        def __exit__(self, *exc):
            active.pop()

    monkeypatch.setattr(cuda_graph.torch.cuda, "Stream", lambda: FakeStream("side"))
    monkeypatch.setattr(cuda_graph.torch.cuda, "current_stream", lambda: main)
    monkeypatch.setattr(cuda_graph.torch.cuda, "stream", FakeContext)
    cuda_graph.CudaBackend().warmup(lambda: events.append(f"step on {active[-1]}"), steps=2)
    assert events == ["side waits for main", "step on side", "step on side", "main waits for side"]


@pytest.mark.parametrize("value, message", [
    ("on", "cuda_graphs=on cannot be used: it needs a CUDA device; set cuda_graphs=auto or off"),
    ("sometimes", "cuda_graphs must be one of auto, on, off; got 'sometimes'"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="on is valid where CUDA exists")
def test_cli_refuses_cuda_graphs_it_cannot_honour_in_one_line(tmp_path, capsys, value, message):
    code, line, _ = run_cli(["train", *synthetic_args(tmp_path, "--set", f"cuda_graphs={value}")], capsys)
    assert (code, line) == (2, f"largebatch: error: {message}")
    assert not (tmp_path / "run").exists()
