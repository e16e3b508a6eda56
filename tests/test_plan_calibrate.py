"""Calibration fits recover known constants; the CLI prints one-line errors and writes its outputs."""

import pytest

from largebatch.cli import main
from largebatch.plan.calibrate import default_sizes, fit_network, parse_size
from largebatch.plan.cli import parse_processes
from largebatch.plan.costs import Network, allreduce_time
from largebatch.plan.errors import PlanError


@pytest.mark.parametrize("algorithm", ["ring", "rabenseifner"])
@pytest.mark.parametrize("p", [2, 4, 6])
def test_fit_recovers_alpha_beta_from_synthetic_times(algorithm, p):
    true = Network(alpha=2.5e-5, beta=7e-10, gamma=1e-10)
    sizes = default_sizes()
    times = [allreduce_time(algorithm, p, n, true) for n in sizes]
    fit = fit_network(sizes, times, p, algorithm, gamma=true.gamma)
    assert fit.network.alpha == pytest.approx(true.alpha, rel=1e-6)
    assert fit.network.beta == pytest.approx(true.beta, rel=1e-6)
    assert fit.max_rel_error < 1e-6


def test_fit_with_noise_stays_close():
    import numpy as np

    true = Network(alpha=1e-4, beta=1e-9)
    sizes = default_sizes()
    rng = np.random.default_rng(1)
    times = [allreduce_time("ring", 2, n, true) * (1 + rng.normal(0, 0.03)) for n in sizes]
    fit = fit_network(sizes, times, 2)
    assert fit.network.alpha == pytest.approx(true.alpha, rel=0.1)
    assert fit.network.beta == pytest.approx(true.beta, rel=0.1)


def test_fit_clamps_negative_latency():
    sizes = [2**20, 2**24, 2**28]
    times = [n * 1e-9 - 1e-5 for n in sizes]  # a line through a negative intercept
    fit = fit_network(sizes, times, 2)
    assert fit.network.alpha == 0.0 and fit.network.beta > 0


def test_sizes_and_processes_parsing():
    assert default_sizes()[0] == 1024 and default_sizes()[-1] == 256 * 2**20 and len(default_sizes()) == 10
    assert parse_size("64M") == 64 * 2**20 and parse_size("1k") == 1024
    with pytest.raises(PlanError):
        parse_size("lots")
    assert parse_processes("1:16") == [1, 2, 4, 8, 16]
    assert parse_processes("3:12,1000") == [3, 4, 8, 12, 1000]
    with pytest.raises(PlanError):
        parse_processes("0,4")


def test_plan_command_writes_table_and_plot(tmp_path, capsys):
    rc = main(["plan", "--model", "resnet50", "--hardware", "stampede2-knl", "--profile-source", "paper",
               "--processes", "512,2048", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    # the trainer drops the last partial batch: 90 epochs x floor(1,281,167 / 32,768) = 90 x 39
    assert "3510 iterations" in out and "| 2048 | 16 | 3510 |" in out
    assert (tmp_path / "plan-resnet50-stampede2-knl.png").stat().st_size > 1000
    assert "| 512 |" in (tmp_path / "plan-resnet50-stampede2-knl.md").read_text()


@pytest.mark.slow
def test_bench_compute_writes_images_per_s(tmp_path, capsys):
    yaml_path = tmp_path / "hw.yaml"
    yaml_path.write_text("name: t\nnetwork: {alpha: 1.0e-4, beta: 1.0e-9}\n")
    assert main(["bench", "compute", "resnet18", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--image-size", "32", "--num-classes", "10", "--yaml", str(yaml_path)]) == 0
    from largebatch.plan.hardware import load_hardware

    hw = load_hardware(yaml_path)
    assert hw.images_per_s["resnet18"] > 0 and hw.network.alpha == 1e-4
    assert any(s.startswith("compute.images_per_s.resnet18:") for s in hw.sources)


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--model", "resnet50"],
        ["plan", "--model", "nope", "--hardware", "stampede2-knl"],
        ["plan", "--model", "resnet50", "--hardware", "stampede2-knl", "--processes", "x"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--sustained-fraction", "3"],
        ["bench", "compute", "no_such_net"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--images-per-s", "-10"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--images-per-s", "nan"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--images-per-s", "inf"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--global-batch", "64", "--processes", "1:128"],
        ["plan", "--model", "resnet50", "--hardware", "h200-ib", "--processes", "12", "--algorithm", "hierarchical"],
        ["plan", "--model", "resnet50", "--hardware", "h100-ib", "--algorithm", "hierarchical"],
        ["bench", "compute", "resnet18", "--batch", "8,x"],
        ["bench", "comm", "--fit-min-size", "1G"],
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("largebatch: error: ") and "\n" not in err


def test_plan_out_that_is_a_file_is_one_line_and_keeps_the_file(tmp_path, capsys):
    taken = tmp_path / "plans"
    taken.write_text("mine")
    assert main(["plan", "--model", "resnet50", "--hardware", "h100-ib", "--profile-source", "paper",
                 "--processes", "8", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("largebatch: error: --out ") and "\n" not in err
    assert taken.read_text() == "mine"


def test_plan_grad_dtype_halves_the_gradient_bytes(capsys):
    base = ["plan", "--model", "resnet50", "--hardware", "h200-ib", "--profile-source", "paper", "--processes", "64"]
    assert main(base) == 0
    fp32 = capsys.readouterr().out
    assert main([*base, "--grad-dtype", "bf16"]) == 0
    bf16 = capsys.readouterr().out
    assert "102 MB of fp32 gradients" in fp32 and "51 MB of bf16 gradients" in bf16
    assert "hierarchical" in fp32


def test_step_time_fit_recovers_a_line_and_reports_residuals():
    from largebatch.plan.calibrate import fit_step_time

    batches = [16, 32, 64, 256]
    fit, residuals = fit_step_time(batches, [0.004 + b * 2e-4 for b in batches])
    assert fit.fixed_s == pytest.approx(0.004) and fit.per_image_s == pytest.approx(2e-4)
    assert fit.batches == tuple(batches) and max(abs(r) for r in residuals) < 1e-9
    with pytest.raises(PlanError, match="two different batch sizes"):
        fit_step_time([32, 32], [0.01, 0.011])
    with pytest.raises(PlanError, match="did not grow with the batch"):
        fit_step_time([4, 64], [0.011, 0.010])


def test_bench_compute_with_a_batch_list_writes_a_step_time_fit(tmp_path, capsys):
    yaml_path = tmp_path / "hw.yaml"
    yaml_path.write_text("name: t\nnetwork: {alpha: 1.0e-4, beta: 1.0e-9}\n")
    # far-apart batches, so that the work per image shows above the noise of a shared machine
    assert main(["bench", "compute", "mlp", "--batch", "4,2048", "--steps", "3", "--warmup", "1", "--threads", "1",
                 "--num-classes", "10", "--yaml", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert "batch 4," in out and "batch 2048," in out and "step time = " in out
    from largebatch.plan.hardware import load_hardware

    fit = load_hardware(yaml_path).step_time["mlp"]
    assert fit.batches == (4, 2048) and fit.per_image_s > 0 and fit.fixed_s >= 0
    assert any(s.startswith("compute.step_time.mlp: `largebatch bench compute mlp --batch 4,2048 --threads 1`")
               for s in load_hardware(yaml_path).sources)


def test_bench_comm_fits_the_network_its_timings_came_from_and_writes_it(tmp_path, capsys, monkeypatch):
    """The comm handler end to end, with the timings of a known network standing in for the
    spawned processes: the file it writes holds that network, with the command as its source."""
    from largebatch.plan import calibrate
    from largebatch.plan.hardware import load_hardware

    true = Network(alpha=3e-5, beta=4e-10, gamma=2e-11)

    def timed(processes, sizes, reps, backend):
        return "gloo", list(sizes), [allreduce_time("ring", processes, n, true) for n in sizes]

    monkeypatch.setattr(calibrate, "measure_gamma", lambda: true.gamma)
    monkeypatch.setattr(calibrate, "measure_allreduce", timed)
    yaml_path = tmp_path / "hw.yaml"
    yaml_path.write_text("name: mine\ncompute: {images_per_s: {mlp: 100.0}}\n")
    assert main(["bench", "comm", "--processes", "4", "--min-size", "4K", "--max-size", "64M",
                 "--yaml", str(yaml_path)]) == 0
    assert "fitted as ring" in capsys.readouterr().out
    hw = load_hardware(yaml_path)
    assert hw.name == "mine" and hw.algorithm == "ring" and hw.images_per_s == {"mlp": 100.0}
    assert (hw.network.alpha, hw.network.beta, hw.network.gamma) == pytest.approx(
        (true.alpha, true.beta, true.gamma), rel=1e-3)  # the file keeps 4 significant digits
    assert any(s.startswith("network: `largebatch bench comm --processes 4 --min-size 4K --max-size 64M`")
               for s in hw.sources)
