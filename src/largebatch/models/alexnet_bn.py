"""AlexNet-BN, the network of "ImageNet Training in Minutes" (You et al., Intel Caffe 1.0.7).

AlexNet (Krizhevsky et al. 2012, in its BVLC Caffe form: 96-256-384-384-256 filters, 227x227
input) with local response normalisation removed and BatchNorm inserted before conv2, conv3,
conv4 and conv5, i.e. after pool1, pool2, relu3 and relu4. The fully connected layers have no
BatchNorm; fc6 and fc7 are followed by dropout 0.5. BatchNorm is affine (Caffe's BatchNorm +
Scale pair).

Where this module may differ from the released network (see docs/models_and_data.md):
- ``groups`` (default 2) on conv2, conv4 and conv5: BVLC's AlexNet, from which Caffe's networks
  descend, splits them in two groups (a relic of its two-GPU training), and so we do by default;
  that gives the paper's figures (61 M parameters, 0.72 G MACs per image). We could not check
  the released AlexNet-BN prototxt itself, so groups=1 is offered too (62.38 M, 1.14 G).
- An adaptive average pool to 6x6 sits before fc6, so 224x224 inputs work too; at 227x227 the
  feature map already is 6x6 and the pool is the identity.
- Initialisation follows BVLC's reference (Gaussian std 0.01, fc6/fc7 std 0.005; biases 0 or
  0.1 as BVLC sets them), not torch's default.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["AlexNetBN", "alexnet_bn"]

# (name, std, bias) as in BVLC's reference AlexNet
_CAFFE_INIT = {
    "conv1": (0.01, 0.0),
    "conv2": (0.01, 0.1),
    "conv3": (0.01, 0.0),
    "conv4": (0.01, 0.1),
    "conv5": (0.01, 0.1),
    "fc6": (0.005, 0.1),
    "fc7": (0.005, 0.1),
    "fc8": (0.01, 0.0),
}


class AlexNetBN(nn.Module):
    """AlexNet-BN. ``features`` and ``classifier`` are named after the Caffe layers."""

    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, groups: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"alexnet_bn groups must be 1 or 2, got {groups!r}")
        g = groups
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 96, kernel_size=11, stride=4)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("pool1_bn", nn.BatchNorm2d(96)),
                    ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=g)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("pool2_bn", nn.BatchNorm2d(256)),
                    ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("relu3_bn", nn.BatchNorm2d(384)),
                    ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=g)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("relu4_bn", nn.BatchNorm2d(384)),
                    ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=g)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
                ]
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(dropout)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(dropout)),
                    ("fc8", nn.Linear(4096, num_classes)),
                ]
            )
        )
        for name, module in [*self.features.named_children(), *self.classifier.named_children()]:
            if name in _CAFFE_INIT:
                std, bias = _CAFFE_INIT[name]
                nn.init.normal_(module.weight, std=std)
                nn.init.constant_(module.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))  # flatten copes with channels_last


def alexnet_bn(num_classes: int, in_channels: int = 3, groups: int = 2, dropout: float = 0.5) -> AlexNetBN:
    """The paper's AlexNet-BN for 227x227 inputs (224 works too)."""
    return AlexNetBN(num_classes=num_classes, in_channels=in_channels, groups=groups, dropout=dropout)
