"""The GPU path's correctness where the CPU can show it (issue 18): optimizer state placement,
the fp16 fallback under GradScaler, the Triton table's rebuilds, the compiled path under graphs.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors; a 'meta' device
stands in for a second device where only placement matters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from largebatch.optim import LAMB, LARS

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


def _conv_and_bias(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter((torch.randn(8, 4, 3, 3) * 0.1).to(dtype)),
            torch.nn.Parameter((torch.randn(8) * 0.1).to(dtype))]


def _make(kind: str, params, implementation: str):
    if kind == "lars":
        return LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
                    implementation=implementation)
    return LAMB(params, lr=0.01, weight_decay=1e-2, implementation=implementation)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_state_saved_on_the_cpu_is_loaded_onto_the_parameters_device(kind):
    """Every state tensor a kernel dereferences (LAMB's step count included) follows the parameter."""
    params = _conv_and_bias(torch.float32)
    opt = _make(kind, params, "foreach")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    on_meta = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
    loaded = _make(kind, on_meta, "foreach")
    loaded.load_state_dict(saved)
    for p in on_meta:
        for name, value in loaded.state[p].items():
            assert value.device == p.device, f"state[{name!r}] stayed on {value.device}"


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_fp16_state_laid_out_unlike_the_parameter_is_unscaled_and_skipped(kind, interpreter, seed):
    """channels_last switched on resume: the loaded buffers are contiguous, the parameter and its
    gradient channels_last, so the conv weight takes the single-tensor fallback. GradScaler has been
    told the optimizer unscales and skips by itself: the fallback must too."""
    torch.manual_seed(seed)
    params = _conv_and_bias(torch.float16)
    opt = _make(kind, params, "triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    for p in params:  # the resumed run uses channels_last
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    resumed = _make(kind, params, "triton")
    resumed.load_state_dict(saved)
    reference = _make(kind, [torch.nn.Parameter(p.detach().clone()) for p in params], "foreach")
    reference.load_state_dict(copy.deepcopy(saved))
    buffer = next(b for b in resumed.state[params[0]].values() if b.dim() == 4)
    assert buffer.stride() != params[0].stride()  # the case under test

    scale = 1024.0
    grads = [torch.randn_like(p) for p in params]
    # an overflow step: nothing may change, nothing may become inf
    before = [p.detach().clone() for p in params], copy.deepcopy(resumed.state_dict()["state"])
    for p, g in zip(params, grads, strict=True):
        p.grad = g * scale
    params[0].grad[0, 0, 0, 0] = float("inf")
    resumed.grad_scale = torch.tensor(scale)
    resumed.found_inf = torch.tensor(1.0)
    resumed.step()
    for p, old in zip(params, before[0], strict=True):
        assert torch.equal(p.detach(), old)
    for i, st in resumed.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, before[1][i][name]), f"state {i}.{name} changed on a skipped step"

    # a finite step: the scaled gradients give the update of the unscaled ones
    for p, g in zip(params, grads, strict=True):
        p.grad = g * scale
    resumed.found_inf = torch.tensor(0.0)
    resumed.step()
    for p, g in zip(reference.param_groups[0]["params"], grads, strict=True):
        p.grad = g.clone()
    reference.step()
    for a, b in zip(params, reference.param_groups[0]["params"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2e-3, atol=2e-4)


# ---- data: decode=cpu batches, loader-thread failures ------------------------------------------

def _pillow_folder(tmp_path):
    from support.images import open_folder, write_textured_tree

    return open_folder(write_textured_tree(tmp_path), decode="cpu")


def test_pillow_crops_are_stacked_by_the_loader_not_in_the_main_thread(tmp_path):
    """The batch the loader hands over (pinned by its pin-memory thread on a GPU) is the memory
    the main thread copies to the device: no restack into pageable memory on the way."""
    src = _pillow_folder(tmp_path)
    loader = src._loaders["train"][0]
    collated = []
    collate = loader.collate_fn

    def spy(items):
        batch = collate(items)
        collated.append(batch[0])
        return batch

    loader.collate_fn = spy
    for x, _, _ in src._run("train", [[(0, 11), (1, 12), (2, 13)], [(3, 14), (4, 15)]]):
        made = collated.pop(0)
        assert isinstance(made, torch.Tensor) and made.data_ptr() == x.data_ptr()
        assert x.shape == (len(x), 3, src.image_size, src.image_size)


def test_a_pin_memory_thread_failure_is_one_line_naming_its_cause(tmp_path):
    """torch re-raises the pin-memory thread's error in the main thread, traceback in the message."""
    from torch._utils import ExceptionWrapper

    from largebatch.data import DataError

    src = _pillow_folder(tmp_path)

    class PinFails:
        def __iter__(self):
            return self

        def __next__(self):
            try:
                raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
            except RuntimeError:
                ExceptionWrapper(where="in pin memory thread for device 0").reraise()

    _, sampler, images = src._loaders["train"]
    src._loaders["train"] = (PinFails(), sampler, images)
    with pytest.raises(DataError) as caught:
        next(src._run("train", [[(0, 1)]]))
    message = str(caught.value)
    assert "\n" not in message and message.endswith("RuntimeError: CUDA error: out of memory (cudaHostAlloc)")
    assert "pin" in message


# ---- CUDA graphs --------------------------------------------------------------------------------

def test_graphs_refuse_the_compiled_lars_path_in_one_line():
    from largebatch.config import ConfigError
    from largebatch.cuda_graph import graphs_decision

    kw = dict(device=torch.device("cuda", 0), distributed=False, fp16=False, optimizer="lars", input_bytes=1)
    use, why = graphs_decision("auto", implementation="compiled", **kw)
    assert not use and "implementation=compiled" in why and "\n" not in why
    with pytest.raises(ConfigError, match="implementation=compiled"):
        graphs_decision("on", implementation="compiled", **kw)
    for implementation in ("auto", "triton", "foreach"):
        assert graphs_decision("auto", implementation=implementation, **kw) == (True, "on")


def test_capture_is_thread_local_so_the_pin_memory_thread_cannot_spoil_it(monkeypatch):
    """torch.cuda's graph pieces stood in for: what CudaBackend asks of them is checked."""
    from largebatch import cuda_graph

    modes = []

    class FakeGraph:
        def pool(self):
            return "pool"

        def replay(self):
            pass

    class FakeCapture:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            modes.append(capture_error_mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    cuda_graph.CudaBackend().capture(lambda: (torch.zeros(()),))
    assert modes == ["thread_local"]


# ---- the Triton address table -------------------------------------------------------------------

def test_the_triton_table_is_built_once_while_allocations_drift(tmp_path, interpreter, monkeypatch):
    """50+ eager steps of a real Trainer on the Triton path, with every step's gradients kept
    alive elsewhere (so that fresh gradients could never land at the old addresses, as happens
    when decoded images of varying sizes share the allocator): the table is not rebuilt."""
    from support.runs import config_of, tiny_config

    from largebatch.optim import _triton
    from largebatch.trainer import Trainer

    builds = []
    build = _triton._build
    monkeypatch.setattr(_triton, "_build", lambda *args: builds.append(1) or build(*args))
    trainer = Trainer(config_of(tiny_config(tmp_path / "drift", **{
        "optim.implementation": "triton", "batch_size": 16, "epochs": 2, "log_every": 100})))
    kept = []
    trainer.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: kept.append([p.grad for g in opt.param_groups for p in g["params"]]))
    result = trainer.run()
    assert result.steps >= 50 and len(kept) == result.steps
    assert len(builds) <= 2, f"{len(builds)} table builds in {result.steps} steps"


def test_a_table_that_would_be_rebuilt_during_capture_is_refused(interpreter, monkeypatch):
    """Built during capture, the table's upload would be replayed from a host buffer freed since:
    refused with a RuntimeError (GraphedStep then reports it in one line and steps eagerly)."""
    from largebatch.optim import _triton

    p, g = torch.zeros(8), torch.ones(8)
    cache: dict = {}
    _triton.prepare(cache, "k", [[p], [g]], 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA stood in for: capturing now
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _triton.prepare(cache, "k", [[p], [g]], 2) is cache["k"]  # unchanged: reused
    with pytest.raises(RuntimeError, match="capture"):
        _triton.prepare(cache, "k", [[p], [torch.ones(8)]], 2)


def test_an_odd_sized_tensor_does_not_drop_its_group_to_scalar_access(interpreter, seed):
    """A 10-class bias among aligned tensors: the aligned ones keep 128-bit access (their own table),
    and the update still equals the foreach path's."""
    from largebatch.optim import _triton

    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n) * 0.1) for n in (64, 10, 4096)]
    grads = [torch.randn_like(p) for p in params]
    prepared = _triton.prepare({}, "k", [params, grads], 2)
    widths = sorted((part.vec, part.n_chunks) for part in prepared.table.parts)
    assert widths == [(1, 1), (4, 2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for opt_params, implementation in ((params, "triton"), (twins, "foreach")):
        for p, g in zip(opt_params, grads, strict=True):
            p.grad = g.clone()
        LARS(opt_params, lr=0.5, weight_decay=1e-3, trust_coefficient=0.02, implementation=implementation).step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- the batched crop of the device-decode path -----------------------------------------------

def _crop_one_by_one(img, size, crop=None, resize=None):
    """The per-image way: slice, F.interpolate with antialiasing, mirror (torch's own filter)."""
    import torch.nn.functional as F

    from largebatch.data.batch_decode import centre_crop_plan

    def resample(x, out):
        return F.interpolate(x.unsqueeze(0).float(), size=out, mode="bilinear", antialias=True,
                             align_corners=False)[0]

    if crop is not None:
        (top, left, ch, cw), flip = crop
        x = resample(img[:, top: top + ch, left: left + cw], (size, size))
        return x.flip(-1) if flip else x
    _, h, w = img.shape
    (nh, nw), (top, left) = centre_crop_plan(w, h, size, resize)
    return resample(img, (nh, nw))[:, top: top + size, left: left + size]


def test_batched_crop_equals_the_per_image_resample_and_ignores_its_batch(seed, monkeypatch):
    """One batched resample (padded images, two matrix products) gives torch's antialiased
    bilinear crops, image by image, within rounding; splitting the batch changes no pixel."""
    from largebatch.data import batch_decode
    from largebatch.data.batch_decode import crop_batch, train_crop

    gen = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(20, 90, (), generator=gen)), int(torch.randint(20, 90, (), generator=gen)))
             for _ in range(12)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    crops = [train_crop(img.shape[2], img.shape[1], seed + k, (0.08, 1.0)) for k, img in enumerate(images)]
    for size, kw, one in ((24, {"crops": crops}, lambda k: {"crop": crops[k]}),
                          (24, {"resize": 28}, lambda k: {"resize": 28}),
                          (48, {"crops": crops}, lambda k: {"crop": crops[k]})):  # some crops enlarged
        batched = crop_batch(images, size, **kw)
        reference = torch.stack([_crop_one_by_one(img, size, **one(k)) for k, img in enumerate(images)])
        diff = (batched.float() - reference.round().clamp(0, 255)).abs()
        assert float(diff.max()) <= 1 and float(diff.mean()) < 0.01
        monkeypatch.setattr(batch_decode, "BATCH_BYTES", 3 * 90 * 90 * 8 * 2)  # at most 2 images a batch
        assert torch.equal(crop_batch(images, size, **kw), batched)
        assert torch.equal(crop_batch(images[5:6], size, **{k: v[5:6] if k == "crops" else v for k, v in kw.items()}),
                           batched[5:6])
        monkeypatch.undo()
