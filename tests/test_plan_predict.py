"""Planner arithmetic against hand computations; hardware files are validated."""

import pytest

from largebatch.plan.costs import Network
from largebatch.plan.errors import PlanError
from largebatch.plan.hardware import Hardware, list_hardware, load_hardware, parse_hardware
from largebatch.plan.model import PAPER_PROFILES, Profile, resolve_profile
from largebatch.plan.predict import comm_time, iterations, predict, predict_iteration

HW = Hardware("toy", Network(alpha=1e-5, beta=1e-9, gamma=0.0), flops=1e12)
PROF = Profile("toy", params=1_000_000, flops=1e9)


def test_iterations_match_papers_counts():
    assert iterations(90, 1_281_167, 256, drop_last=False) == 450_411
    assert iterations(90, 1_281_167, 8192, drop_last=False) == 14_076
    assert iterations(90, 1_281_167, 32768, drop_last=False) == 3_519
    assert iterations(90, 1_281_167, 65536, drop_last=False) == 1_760
    with pytest.raises(PlanError):
        iterations(0, 10, 1)


def test_iteration_by_hand():
    it = predict_iteration(PROF, HW, 4, 64, algorithm="ring", bucket_bytes=None)
    # 16 images x 3 x 1 GFLOP at 1 TFLOP/s = 48 ms; forward a third of it
    assert it.forward_s == pytest.approx(0.016)
    assert it.backward_s == pytest.approx(0.032)
    # ring, p = 4, 4 MB of gradients: 6 alpha + 2 * 4 MB * 3/4 beta
    assert it.comm_s == pytest.approx(6e-5 + 6e-3)
    assert it.serial_s == pytest.approx(0.05406)
    # one bucket: it can only start after backward
    assert it.overlap_s == pytest.approx(0.016 + 0.032 + 0.00606)
    assert it.efficiency() == pytest.approx(0.048 / 0.05406)
    (pred,) = predict(PROF, HW, [4], 64, epochs=1, dataset_size=1000, algorithm="ring", bucket_bytes=None)
    assert pred.iterations == 1000 // 64 == 15  # full batches only, as the trainer runs
    assert pred.time_to_train() == pytest.approx(15 * 0.05406)


def test_buckets_and_overlap_by_hand():
    # 4 MB in 1 MB buckets: four ring all-reduces, each 6 alpha + 1.5 MB beta
    total, last, used = comm_time(HW, 4, 4e6, "ring", 1e6)
    assert total == pytest.approx(4 * (6e-5 + 1.5e-3))
    assert last == pytest.approx(6e-5 + 1.5e-3)
    assert used == "ring"
    it = predict_iteration(PROF, HW, 4, 64, algorithm="ring", bucket_bytes=1e6)
    assert it.overlap_s == pytest.approx(0.016 + max(0.032 + last, total))


def test_measured_throughput_and_update_term():
    hw = Hardware("m", Network(1e-5, 1e-9), flops=1e12, memory_bandwidth=28e9, images_per_s={"toy": 200.0})
    it = predict_iteration(PROF, hw, 2, 64)
    assert it.compute_s == pytest.approx(32 / 200.0)  # measured: contains the optimizer step
    assert it.update_s == 0.0
    flops_hw = Hardware("f", Network(1e-5, 1e-9), flops=1e12, memory_bandwidth=28e9)
    it = predict_iteration(PROF, flops_hw, 1, 64)
    assert it.update_s == pytest.approx(1e6 * 28 / 28e9)
    assert it.comm_s == 0.0
    assert it.efficiency() == pytest.approx(1.0)


def test_model_with_more_work_per_parameter_scales_better():
    resnet, alexnet = PAPER_PROFILES["resnet50"], PAPER_PROFILES["alexnet"]
    assert resnet.flops_per_param / alexnet.flops_per_param == pytest.approx(13.6, rel=0.02)
    hw = load_hardware("stampede2-knl")
    e_res = predict_iteration(resnet, hw, 1024, 32768).efficiency()
    e_alex = predict_iteration(alexnet, hw, 1024, 32768).efficiency()
    assert e_res > e_alex


def test_shipped_hardware_loads_and_cites_sources():
    names = list_hardware()
    assert {"stampede2-skx", "stampede2-knl", "h100-ib"} <= set(names)
    for name in names:
        hw = load_hardware(name)
        assert hw.sources
        assert hw.network.alpha > 0 and hw.network.beta > 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"name": "x", "network": {"alpha": 1e-6}, "compute": {"flops": 1e12}}, "network.beta is required"),
        ({"name": "x", "network": {"alpha": -1, "beta": 1e-9}, "compute": {"flops": 1e12}}, "network.alpha"),
        ({"name": "x", "network": {"alpha": 1e-6, "beta": "fast"}, "compute": {"flops": 1e12}}, "network.beta"),
        ({"name": "x", "network": {"alpha": 1e-6, "beta": 1e-9}, "compute": {}}, "compute needs"),
        ({"name": "x", "network": {"alpha": 1e-6, "beta": 1e-9}, "compute": {"flops": 1, "speed": 2}}, "'speed'"),
        (
            {
                "name": "x",
                "network": {"alpha": 1e-6, "beta": 1e-9},
                "compute": {"peak_flops": 1, "sustained_fraction": 2},
            },
            "at most 1",
        ),
    ],
)
def test_bad_hardware_is_one_clear_error(doc, message):
    with pytest.raises(PlanError, match=message):
        parse_hardware(doc, "bad.yaml")


def test_yaml_exponent_without_dot_is_accepted(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("name: t\nnetwork: {alpha: 1e-6, beta: 2e-10}\ncompute: {images_per_s: {m: 10}}\n")
    hw = load_hardware(path)
    assert hw.network.beta == 2e-10
    with pytest.raises(PlanError, match="unknown hardware"):
        load_hardware("no-such-machine")


def test_profiles():
    assert resolve_profile("resnet50", source="paper").params == 25_600_000
    assert resolve_profile("mine", params=10, flops=20).flops == 20
    with pytest.raises(PlanError, match="no profile"):
        resolve_profile("vgg99", source="paper")


# ---- two-level machines, measured step times, gradient bytes ---------------------------------------

TWO_LEVEL = {
    "name": "t2",
    "network": {"alpha": 5e-6, "beta": 2e-11, "gamma": 0.0, "algorithm": "hierarchical"},
    "node": {"processes": 4, "alpha": 1e-6, "beta": 2.5e-12},
    "compute": {"step_time": {"toy": {"fixed_s": 0.01, "per_image_s": 0.001, "batches": [8, 32]}}},
}


def test_step_time_fit_prices_compute_as_fixed_plus_per_image():
    hw = parse_hardware(TWO_LEVEL, "t2.yaml")
    assert hw.algorithm == "hierarchical" and hw.node.per_node == 4 and hw.node.inter == hw.network
    it = predict_iteration(PROF, hw, 8, 256, algorithm="hierarchical", bucket_bytes=None)
    assert it.compute_s == pytest.approx(0.01 + 32 * 0.001)  # 32 images per process
    assert it.update_s == 0.0 and it.fixed_s == 0.01
    # T(1) = 0.01 + 256 x 0.001 (one process, the whole batch); p T(p) = 8 (0.042 + comm)
    assert it.efficiency() == pytest.approx((0.01 + 0.256) / (8 * (0.042 + it.comm_s)))
    assert it.overlap_s == pytest.approx(0.032 / 3 + max(0.064 / 3 + it.last_bucket_s, it.comm_s) + 0.01)
    # an explicit images/s wins over the fit
    assert predict_iteration(PROF, hw, 8, 256, images_per_s=100.0).compute_s == pytest.approx(0.32)


def test_hierarchical_comm_by_hand_and_grad_bytes_halve_it():
    hw = parse_hardware(TWO_LEVEL, "t2.yaml")
    n = PROF.params * 4  # fp32
    it = predict_iteration(PROF, hw, 8, 256, algorithm="hierarchical", bucket_bytes=None)
    # inside (k = 4): 6 a + 2n * 3/4 b; between (m = 2, n/4 each) the cheapest is recursive
    # doubling, 1 a + n/4 b (ring and Rabenseifner send the same bytes in 2 messages)
    inside = 6 * 1e-6 + 1.5 * n * 2.5e-12
    between = 1 * 5e-6 + n / 4 * 2e-11
    assert it.comm_s == pytest.approx(inside + between)
    half = predict_iteration(PROF, hw, 8, 256, algorithm="hierarchical", bucket_bytes=None, grad_bytes=2)
    # bytes halve, messages do not
    assert half.comm_s == pytest.approx(6 * 1e-6 + 1.5 * n / 2 * 2.5e-12 + 5e-6 + n / 8 * 2e-11)
    with pytest.raises(PlanError, match="multiple of 4"):
        predict_iteration(PROF, hw, 6, 240, algorithm="hierarchical")
    # 'best' skips the two-level scheme where processes do not fill nodes, and flat inside one node
    assert predict_iteration(PROF, hw, 6, 240).algorithm in ("ring", "recursive_doubling", "rabenseifner", "binomial")
    one_node = predict_iteration(PROF, hw, 4, 256, algorithm="ring", bucket_bytes=None)
    assert one_node.comm_s == pytest.approx(6 * 1e-6 + 1.5 * n * 2.5e-12)  # NVLink-class links only


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network": {"alpha": 1e-6, "beta": 1e-9, "algorithm": "tree"}}, "network.algorithm must be one of"),
        ({"network": {"alpha": 1e-6, "beta": 1e-9, "algorithm": "hierarchical"}}, "needs a node section"),
        ({"network": {"alpha": 1e-6, "beta": 1e-9, "processes": 0}}, "network.processes"),
        ({"network": {"alpha": 1e-6, "beta": 1e-9, "processes": 2.5}}, "network.processes"),
        ({"node": {"alpha": 1e-6, "beta": 1e-9}}, "node.processes"),
        ({"node": {"processes": 8, "alpha": 1e-6}}, "node.beta is required"),
        ({"compute": {"step_time": {"m": {"fixed_s": 0.1}}}}, "per_image_s is required"),
        ({"compute": {"step_time": {"m": {"fixed_s": -1, "per_image_s": 1e-3}}}}, "fixed_s"),
    ],
)
def test_bad_two_level_and_step_time_files(change, message):
    doc = {"name": "x", "network": {"alpha": 1e-6, "beta": 1e-9}, "compute": {"flops": 1e12}, **change}
    with pytest.raises(PlanError, match=message):
        parse_hardware(doc, "bad.yaml")


def test_processes_and_rates_that_make_no_sense_are_refused():
    with pytest.raises(PlanError, match="smaller than 128 processes"):
        predict_iteration(PROF, HW, 128, 64)
    for bad in (-10.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(PlanError, match="images/s must be a finite number > 0"):
            predict_iteration(PROF, HW, 2, 64, images_per_s=bad)


def test_planner_sources_cite_only_what_the_repository_holds():
    from pathlib import Path

    import largebatch.plan as plan

    root = Path(plan.__file__).parent
    texts = {p.name: p.read_text() for p in [*root.glob("*.py"), *(root / "hardware").glob("*.yaml")]}
    for name, text in texts.items():
        for outside in ("PAPER.md", "DESIGN.md", "the issue"):
            assert outside not in text, f"{name} cites {outside}"
