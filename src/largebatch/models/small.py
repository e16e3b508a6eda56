"""Small-input networks (28x28 Fashion-MNIST, 32x32 CIFAR) sized for a 2-core CPU.

Each works for both sizes: the spatial size is reduced with padded pools and a global or
adaptive pool before the classifier. Default ``in_channels`` is 1 (Fashion-MNIST); pass 3 for
CIFAR. All use ``flatten`` rather than ``view`` so channels_last inputs work unchanged.

Measured training speeds on the development machine are in docs/benchmarks/data_throughput.md.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["AlexNetBNSmall", "FMNISTNet", "ResNetSmall", "alexnet_bn_small", "fmnist_net", "resnet_small"]


class AlexNetBNSmall(nn.Module):
    """AlexNet-BN's layer pattern at small scale: 5 convs, BatchNorm after pool1, pool2, relu3,
    relu4 (as in the paper's network), then 3 fully connected layers with dropout.

    Filters are width x (1, 2, 3, 3, 2); 3x3 convs except a 5x5 conv1; pools 3x3 stride 2 pad 1,
    so 28 -> 14 -> 7 -> 4 and 32 -> 16 -> 8 -> 4. width=16: 253,546 parameters and 3.79 M MACs at 28x28
    (1 channel, 10 classes).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 256, dropout: float = 0.5
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = width, 2 * width, 3 * width, 3 * width, 2 * width
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                    ("pool1_bn", nn.BatchNorm2d(c1)),
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                    ("pool2_bn", nn.BatchNorm2d(c2)),
                    ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("relu3_bn", nn.BatchNorm2d(c3)),
                    ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("relu4_bn", nn.BatchNorm2d(c4)),
                    ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(c5 * 16, hidden)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(dropout)),
                    ("fc7", nn.Linear(hidden, hidden)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(dropout)),
                    ("fc8", nn.Linear(hidden, num_classes)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class _BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet of basic blocks for small images: 3x3 stem and a 2x2 max pool (28 -> 14), then
    three stages of ``blocks`` blocks with width x (1, 2, 4) filters, strides 1, 2, 2, global
    average pool, linear. width=16, blocks=1: 77,754 parameters, 2.64 M MACs at 28x28.
    ``zero_init_residual`` starts each block's last BatchNorm at gamma = 0 (Goyal et al.).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        blocks: int = 1,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"resnet_small blocks must be >= 1, got {blocks!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            cout = width * mult
            for i in range(blocks):
                layers.append(_BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class FMNISTNet(nn.Module):
    """The compact fast CNN for the Fashion-MNIST demo: three conv-BN-ReLU-maxpool stages of
    width x (1, 2, 4) filters, a global max pool and one linear layer. Max pools after every
    conv keep the cost low (width=16: 24,058 parameters, 1.92 M MACs at 28x28), and bf16
    autocast with channels_last runs it on AMX; no bias before BatchNorm.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in widths:
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def alexnet_bn_small(
    num_classes: int, in_channels: int = 1, width: int = 16, hidden: int = 256, dropout: float = 0.5
) -> AlexNetBNSmall:
    """AlexNet-BN's pattern for 28x28 / 32x32 images."""
    return AlexNetBNSmall(num_classes, in_channels=in_channels, width=width, hidden=hidden, dropout=dropout)


def resnet_small(
    num_classes: int, in_channels: int = 1, width: int = 16, blocks: int = 1, zero_init_residual: bool = False
) -> ResNetSmall:
    """A basic-block ResNet for 28x28 / 32x32 images."""
    return ResNetSmall(
        num_classes, in_channels=in_channels, width=width, blocks=blocks, zero_init_residual=zero_init_residual
    )


def fmnist_net(num_classes: int, in_channels: int = 1, width: int = 16) -> FMNISTNet:
    """The compact CNN for the Fashion-MNIST demo."""
    return FMNISTNet(num_classes, in_channels=in_channels, width=width)
