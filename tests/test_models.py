"""Model registry, the AlexNet-BN layer sequence, parameter and MAC counts from first principles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largebatch.models import (
    MODEL_NAMES,
    OPTION_RULES,
    ModelError,
    ModelProfile,
    build_model,
    check_input,
    check_options,
    count_params,
    default_input_size,
    model_options,
    profile_model,
)

SMALL = ("alexnet_bn_small", "resnet_small", "fmnist_net")


def conv_params(cin: int, cout: int, k: int, groups: int = 1, bias: bool = True) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def fc_params(cin: int, cout: int) -> int:
    return cin * cout + cout


def test_registry_names_and_errors():
    assert set(MODEL_NAMES) == {"alexnet_bn", "alexnet", "resnet50", "mlp", *SMALL}
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; choose one of: alexnet_bn, alexnet"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match=r"model 'resnet_small' has no option 'depth'"):
        build_model("resnet_small", 10, depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("fmnist_net", 0)
    assert default_input_size("alexnet_bn") == 227
    assert default_input_size("resnet50") == 224
    assert all(default_input_size(n) == 28 for n in SMALL)
    assert "zero_init_residual" in model_options("resnet50")


def test_torchvision_parameter_counts():
    assert sum(p.numel() for p in build_model("alexnet", 1000).parameters()) == 61_100_840
    assert sum(p.numel() for p in build_model("resnet50", 1000).parameters()) == 25_557_032


def test_alexnet_bn_layer_sequence():
    model = build_model("alexnet_bn", 1000)
    names = [n for n, _ in model.features.named_children()]
    assert names == [
        "conv1", "relu1", "pool1", "pool1_bn",
        "conv2", "relu2", "pool2", "pool2_bn",
        "conv3", "relu3", "relu3_bn",
        "conv4", "relu4", "relu4_bn",
        "conv5", "relu5", "pool5",
    ]  # fmt: skip
    # BatchNorm right before conv2..conv5, nowhere else; no LRN
    mods = list(model.features.children())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d) and i > 0:
            assert isinstance(mods[i - 1], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())
    f = model.features
    assert (f.conv1.in_channels, f.conv1.out_channels, f.conv1.kernel_size, f.conv1.stride) == (3, 96, (11, 11), (4, 4))
    assert [c.out_channels for c in (f.conv2, f.conv3, f.conv4, f.conv5)] == [256, 384, 384, 256]
    assert [f.conv2.groups, f.conv3.groups, f.conv4.groups, f.conv5.groups] == [2, 1, 2, 2]
    cls = [type(m) for m in model.classifier.children()]
    assert cls == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert all(m.p == 0.5 for m in model.classifier if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("groups", [1, 2])
def test_alexnet_bn_counts_from_first_principles(groups):
    g = groups
    convs = [(3, 96, 11, 1, 55), (96, 256, 5, g, 27), (256, 384, 3, 1, 13), (384, 384, 3, g, 13), (384, 256, 3, g, 13)]
    fcs = [(256 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]
    params = sum(conv_params(ci, co, k, gr) for ci, co, k, gr, _ in convs) + sum(fc_params(*f) for f in fcs)
    params += 2 * (96 + 256 + 384 + 384)  # BatchNorm gamma and beta
    macs = sum(hw * hw * co * (ci // gr) * k * k for ci, co, k, gr, hw in convs) + sum(a * b for a, b in fcs)
    model = build_model("alexnet_bn", 1000, groups=groups)
    prof = profile_model(model, (3, 227, 227))
    assert prof == ModelProfile(params=params, macs=macs)
    if groups == 2:  # the paper's figures: about 61 M parameters and 0.72 G multiply-adds
        assert prof.params == 60_967_464 and abs(prof.macs / 1e9 - 0.72) < 0.01
    # at 227 the 6x6 feature map reaches fc6 unchanged; 224 is accepted too
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 227, 227)).shape == (1, 256, 6, 6)
        assert model.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_profile_tiny_net_by_hand_and_flops():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 out: 64*8*3*9 = 13,824
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, groups=2, bias=False),  # 3x3 out: 9*4*4*9 = 1,296
        nn.Flatten(),
        nn.Linear(36, 5),  # 180
    )
    net.train()
    prof = profile_model(net, (3, 8, 8))
    assert prof.macs == 13_824 + 1_296 + 180
    assert prof.params == (8 * 3 * 9 + 8) + (4 * 4 * 9) + (36 * 5 + 5)
    assert prof.flops == 2 * prof.macs
    assert net.training  # mode restored


def test_profile_linear_on_sequences():
    prof = profile_model(nn.Sequential(nn.Flatten(2), nn.Linear(4, 6)), (7, 2, 2))  # 7 tokens of 4
    assert prof.macs == 7 * 4 * 6


def test_alexnet_and_resnet50_macs():
    # conv1 55^2*64*3*121 + conv2 27^2*192*64*25 + 13^2*(384*192 + 256*384 + 256*256)*9 + fc layers
    alex = 55 * 55 * 64 * 363 + 27 * 27 * 192 * 64 * 25 + 169 * 9 * (384 * 192 + 256 * 384 + 256 * 256)
    alex += 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    assert profile_model(build_model("alexnet", 1000), (3, 224, 224)).macs == alex
    prof = profile_model(build_model("resnet50", 1000), (3, 224, 224))
    assert 4.05e9 < prof.macs < 4.15e9  # the commonly quoted 4.1 G multiply-adds


def test_zero_init_residual():
    r50 = build_model("resnet50", 10, zero_init_residual=True)
    assert all(int(b.bn3.weight.count_nonzero()) == 0 for b in r50.modules() if hasattr(b, "bn3"))
    assert int(build_model("resnet50", 10).layer1[0].bn3.weight.count_nonzero()) > 0
    small = build_model("resnet_small", 10, zero_init_residual=True)
    blocks = [m for m in small.modules() if hasattr(m, "bn2") and hasattr(m, "shortcut")]
    assert len(blocks) == 3 and all(int(b.bn2.weight.count_nonzero()) == 0 for b in blocks)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_small_models_shapes_and_channels_last(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=channels).eval()
    x = torch.randn(4, channels, size, size)
    with torch.no_grad():
        y = model(x)
        y_cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (4, 10)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-4)


def test_small_model_sizes():
    # sized for a 2-core CPU: a few million MACs per 28x28 image at most
    for name in SMALL:
        prof = profile_model(build_model(name, 10), (1, 28, 28))
        assert prof.macs < 4_000_000, name
    prof = profile_model(build_model("fmnist_net", 10), (1, 28, 28))
    # 28x28x16x9 + 14x14x32x16x9 + 7x7x64x32x9 + 64x10
    assert prof.macs == 784 * 16 * 9 + 196 * 32 * 16 * 9 + 49 * 64 * 32 * 9 + 640


def test_imagenet_models_in_channels():
    for name in ("alexnet", "alexnet_bn", "resnet50"):
        model = build_model(name, 7, in_channels=1).eval()
        s = default_input_size(name)
        with torch.no_grad():
            assert model(torch.zeros(1, 1, s, s)).shape == (1, 7)


def test_mlp_shape_and_parameter_count():
    model = build_model("mlp", 4, in_channels=1, image_size=8, hidden=32, depth=2)
    assert count_params(model) == (64 * 32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_every_option_of_every_model_has_a_rule_its_default_keeps():
    for name in MODEL_NAMES:
        options = model_options(name)
        assert set(options) <= set(OPTION_RULES), (name, set(options) - set(OPTION_RULES))
        check_options(name, options)  # the constructor's own defaults pass


@pytest.mark.parametrize(("name", "option", "value", "allowed"), [
    ("fmnist_net", "width", -3, "an integer >= 1"),
    ("fmnist_net", "width", "abc", "an integer >= 1"),
    ("fmnist_net", "width", 2.5, "an integer >= 1"),
    ("fmnist_net", "in_channels", True, "an integer >= 1"),
    ("resnet_small", "blocks", 0, "an integer >= 1"),
    ("resnet_small", "zero_init_residual", "yes", "true or false"),
    ("mlp", "depth", -1, "an integer >= 0"),
    ("alexnet_bn", "groups", 4, "1 or 2"),
    ("alexnet_bn_small", "dropout", 1.0, "a number in [0, 1)"),
    ("alexnet", "dropout", "half", "a number in [0, 1)"),
])
def test_bad_option_values_are_refused_before_building(name, option, value, allowed):
    with pytest.raises(ModelError) as caught:
        build_model(name, 10, **{option: value})
    assert str(caught.value) == f"model.options.{option} must be {allowed} for {name}, got {value!r}"


def test_edge_values_that_are_allowed():
    assert count_params(build_model("mlp", 3, image_size=2, depth=0)) == 4 * 3 + 3  # no hidden layer
    check_options("alexnet_bn_small", {"dropout": 0, "width": 1})  # an int where a float is annotated


def test_check_input_names_the_mismatch():
    with pytest.raises(ModelError, match=r"^model fmnist_net takes 1 input channels but the data's examples are "
                                         r"3 x 28 x 28 \(3 channels\)"):
        check_input(build_model("fmnist_net", 10), "fmnist_net", (3, 28, 28))
    with pytest.raises(ModelError, match=r"^model mlp takes 784 input features but the data's examples are "
                                         r"1 x 32 x 32 \(1024 features\)"):
        check_input(build_model("mlp", 10), "mlp", (1, 32, 32))
    with pytest.raises(ModelError, match=r"^model alexnet_bn cannot take 3 x 28 x 28 inputs: "):
        check_input(build_model("alexnet_bn", 10), "alexnet_bn", (3, 28, 28))


def test_check_input_of_a_fitting_model_changes_nothing(seed):
    """One dry forward pass: no BatchNorm statistics move, no random numbers are drawn, the mode stays."""
    model = build_model("alexnet_bn_small", 10, in_channels=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_input(model, "alexnet_bn_small", (3, 32, 32))
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
