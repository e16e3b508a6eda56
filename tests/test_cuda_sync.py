"""The GPU path on a real GPU (issue 18): the nvJPEG decode race, no host sync on ordinary steps
for every data source, graph capture while the loader's pin-memory thread runs, and the Triton
table never rebuilt during capture. Every test here needs CUDA and skips without it;
benchmarks/gpu_check.sh runs them in its one device call."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from support.checkpoints import final_weights
from support.images import write_textured_tree
from support.runs import STATEFUL_RUN, StopsAtStep, config_of, tiny_config

from largebatch.data.batch_decode import decode_jpegs, device_decode_available
from largebatch.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def _no_host_sync(on: bool):
    """torch raises on any synchronising CUDA call made inside (when ``on``)."""
    if not on:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Strict(Trainer):
    """A real Trainer whose ordinary steps run under sync-debug "error": fetching the step's
    micro-batches and the step itself. Left out: the first steps (capture, cuDNN autotuning, lazy
    state), and the steps that log, evaluate or checkpoint (they read the device by design)."""

    checked = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        observe = self.guard.observe

        def strict_observe(step, loss, grad_ok):  # the loop's next call, also on the device
            with _no_host_sync(self._quiet()):
                observe(step, loss, grad_ok)

        self.guard.observe = strict_observe

    def _quiet(self) -> bool:
        return self.step >= 3 and not self.should_log() and not self.should_evaluate()

    def _batches(self):
        batches = super()._batches()
        while True:
            quiet = self._quiet()
            with _no_host_sync(quiet):
                try:
                    micro = next(batches)
                except StopIteration:
                    return
            yield micro

    def train_step(self, micro):
        quiet = self._quiet()
        with _no_host_sync(quiet):
            out = super().train_step(micro)
        _Strict.checked += quiet
        return out


SOURCES = {
    "synthetic": {"data.augment": True},
    "synthetic_graphs_off": {"data.augment": True, "cuda_graphs": "off"},
    "imagefolder_cpu": {"data.name": "imagefolder", "data.options": {"decode": "cpu", "workers": 2}},
    "imagefolder_device": {"data.name": "imagefolder", "data.options": {"decode": "gpu", "workers": 2}},
}


def _decoder_exempt(monkeypatch) -> None:
    """torchvision's nvJPEG call may wait on the host for its own private stream (TorchCodec's
    port of the same decoder does); that wait is the decoder's, not one on the training stream,
    so it alone runs outside sync-debug "error". Everything of ours around it stays checked."""
    batch_decode = importlib.import_module("largebatch.data.batch_decode")
    decode = batch_decode.decode_jpeg

    def exempt(*args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return decode(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(batch_decode, "decode_jpeg", exempt)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_ordinary_steps_never_wait_for_the_gpu(tmp_path, source, monkeypatch):
    _decoder_exempt(monkeypatch)
    options = dict(SOURCES[source])
    if options.get("data.name") == "imagefolder":
        if options["data.options"]["decode"] == "gpu" and not device_decode_available("cuda"):
            pytest.skip("torchvision here has no GPU JPEG decoder")
        root = write_textured_tree(tmp_path / "tree", n_train=40, n_val=4)
        options["data.options"] = {**options["data.options"], "image_size": 24, "resize": 28}
        options.update({"data.root": root, "model.name": "resnet_small", "model.options": {}, "batch_size": 16})
    else:
        options.update({"batch_size": 32})
    options.update({"device": "cuda", "log_every": 4, "epochs": 2})
    _Strict.checked = 0
    result = _Strict(config_of(tiny_config(tmp_path / source, **options))).run()
    assert result.steps >= 6 and _Strict.checked >= 3


def test_fashion_mnist_steps_never_wait_for_the_gpu(tmp_path):
    fmnist = importlib.import_module("largebatch.data.fashion_mnist")
    try:
        fmnist.fashion_mnist(None, "cpu", 0)
    except Exception as err:
        pytest.skip(f"Fashion-MNIST not available ({err})")
    _Strict.checked = 0
    options = {"data.name": "fashion_mnist", "data.options": {}, "data.augment": True, "model.name": "mlp",
               "device": "cuda", "batch_size": 4096, "epochs": 1, "log_every": 5}
    result = _Strict(config_of(tiny_config(tmp_path / "fmnist", **options))).run()
    assert result.steps >= 6 and _Strict.checked >= 3


def test_decoded_images_never_overwrite_memory_queued_kernels_still_read():
    """torchvision's tracker repro (pytorch/vision#9606) through decode_jpegs: tensors whose
    reductions are still queued behind a long kernel are freed, then a batch is decoded; a decoder
    handed one of those blocks would change the reductions' results."""
    if not device_decode_available("cuda"):
        pytest.skip("torchvision here has no GPU JPEG decoder")
    from torchvision.io import encode_jpeg

    image = torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8)
    jpegs = [encode_jpeg(image)] * 8
    reference = decode_jpegs(jpegs, torch.device("cuda"))[0].clone()
    torch.cuda.synchronize()
    wrong = 0
    for it in range(100):
        tensors = [torch.full(reference.shape, (it + k) % 251, dtype=torch.uint8, device="cuda") for k in range(8)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued work before the reductions
        sums = [t.sum(dtype=torch.int64) for t in tensors]
        expected = [((it + k) % 251) * reference.numel() for k in range(8)]
        del tensors
        out = decode_jpegs(jpegs, torch.device("cuda"))
        checks = [torch.equal(o, reference) for o in out]
        torch.cuda.synchronize()
        wrong += sum(int(s) != e for s, e in zip(sums, expected, strict=True)) + checks.count(False)
    assert wrong == 0


def test_capture_with_the_loader_pinning_alongside(tmp_path):
    """CUDA graphs on, decode=cpu with workers: the pin-memory thread runs while the step is
    captured (thread-local capture); the run must be graphed from start to end."""
    root = write_textured_tree(tmp_path / "tree", n_train=40, n_val=4)
    options = {"data.name": "imagefolder", "data.root": root,
               "data.options": {"decode": "cpu", "workers": 2, "image_size": 24, "resize": 28},
               "model.name": "resnet_small", "model.options": {}, "device": "cuda", "batch_size": 16,
               "cuda_graphs": "on", "epochs": 1}
    trainer = Trainer(config_of(tiny_config(tmp_path / "pinning", **options)))
    assert trainer.graphed
    trainer.run()
    assert trainer._step_fn.captured and trainer._step_fn.failed is None


def test_triton_table_is_not_rebuilt_in_capture_and_graphs_match_eager(tmp_path):
    """LARS on the Triton path, graphs on: capture succeeds (no table rebuild inside it) and the
    weights equal the eager run's."""
    options = {"model.name": "resnet_small", "model.options": {}, "device": "cuda", "micro_batch": 64,
               "optim.implementation": "triton", "data.augment": False}
    Trainer(config_of(tiny_config(tmp_path / "eager", **options, cuda_graphs="off"))).run()
    graphed = Trainer(config_of(tiny_config(tmp_path / "graphed", **options, cuda_graphs="on")))
    graphed.run()
    assert graphed._step_fn.captured and graphed._step_fn.failed is None
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "graphed")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


class _StopAt(StopsAtStep, Trainer):
    """A real (graphed) Trainer that asks itself to stop, as SIGTERM would, after ``stop_at`` steps."""


def test_real_capture_through_run_preempt_and_resume(tmp_path):
    """Graphs on a real GPU: a run pre-empted at step 3 and resumed ends where the uninterrupted
    graphed run ends, and near the eager run (within rounding: cuDNN may pick atomics-based
    kernels, so not bit for bit)."""
    from largebatch.trainer import Preempted

    options = {**STATEFUL_RUN, "device": "cuda", "precision": "fp32"}
    Trainer(config_of(tiny_config(tmp_path / "eager", **options, cuda_graphs="off"))).run()
    whole = Trainer(config_of(tiny_config(tmp_path / "whole", **options, cuda_graphs="on")))
    assert whole.graphed
    whole.run()
    _StopAt.stop_at = 3
    with pytest.raises(Preempted):
        _StopAt(config_of(tiny_config(tmp_path / "resumed", **options, cuda_graphs="on"))).run()
    resumed = Trainer(config_of(tiny_config(tmp_path / "resumed", **options, cuda_graphs="on")),
                      resume="auto")
    assert resumed.run().steps == whole.step
    a, b, c = (final_weights(tmp_path / name) for name in ("whole", "resumed", "eager"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(a[key], c[key], rtol=1e-3, atol=1e-4, msg=key)


def test_triton_table_built_at_most_twice_in_50_eager_steps_with_device_decode(tmp_path, monkeypatch):
    """decode=gpu puts images of varying sizes through the allocator between steps; the gradients
    stay where they are (zeroed in place), so the Triton table is not rebuilt step after step."""
    if not device_decode_available("cuda"):
        pytest.skip("torchvision here has no GPU JPEG decoder")
    from largebatch.optim import _triton

    builds = []
    build = _triton._build
    monkeypatch.setattr(_triton, "_build", lambda *args: builds.append(1) or build(*args))
    root = write_textured_tree(tmp_path / "tree", n_train=32, n_val=2)
    options = {"data.name": "imagefolder", "data.root": root,
               "data.options": {"decode": "gpu", "workers": 2, "image_size": 24, "resize": 28},
               "model.name": "resnet_small", "model.options": {}, "device": "cuda", "batch_size": 16,
               "cuda_graphs": "off", "optim.implementation": "triton", "epochs": 13, "eval_every": 0,
               "log_every": 100}
    trainer = Trainer(config_of(tiny_config(tmp_path / "drift", **options)))
    result = trainer.run()
    tables = sum(len(e.table.parts) for e in trainer.optimizer._tables.values() if e.table is not None)
    assert result.steps >= 50 and len(builds) <= 2 * tables, f"{len(builds)} builds of {tables} tables"
