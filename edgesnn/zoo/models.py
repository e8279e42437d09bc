"""Architectures of the zoo teachers (Fashion-MNIST, 1x28x28 inputs, 10 classes).

They are written the way users write CNNs — modules, functional ReLU and
residual adds — and use average pooling and strided convolutions rather than
max pooling, because an average of spikes is an exact rate code while a max is
not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VGGSmall(nn.Module):
    """VGG-style CNN: 3x3 conv-BN-ReLU layers in stages, average pooling after each stage.

    ``convs`` gives the number of convolutions of each stage; by default two in
    every stage but the last, which has one.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 64, 128), convs=None):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        convs = convs or tuple(2 if stage < len(widths) - 1 else 1 for stage in range(len(widths)))
        for width, count in zip(widths, convs, strict=True):
            for _ in range(count):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels * 3 * 3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: a stem and one basic block per stage, global average pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 64, 128), blocks=(1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(out), 1))


class LeNetJudge(nn.Module):
    """The privacy audit's judge for Fashion-MNIST: a LeNet-style CNN, deliberately unlike the teachers.

    5×5 convolutions, max pooling, tanh in the hidden dense layer and no BatchNorm
    or residuals, trained separately on the real training set, so that an image it
    recognises carries class features rather than one teacher's idiosyncrasies.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.Tanh(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
