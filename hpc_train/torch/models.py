"""Torch models shipped with hpc_train, as job-file factories (`[model] factory = "hpc_train.torch.models:resnet20"`).

Inputs arrive as our loaders give them: images (N, height, width, channels), float32.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(widths: list[int], dropout: float = 0.0) -> nn.Module:
    """Linear layers of `widths` (input features first, classes last), ReLU between, images flattened."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm; the shortcut of a block that halves the size and doubles
    the channels subsamples and pads channels with zeros (the ResNet paper's option A for CIFAR)."""

    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride, self.pad = stride, channels - channels_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return torch.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2): a 3x3 convolution, three stages of
    n blocks at 16, 32 and 64 channels (the last two halve the size), global average pooling, a linear
    classifier. n = 3 is ResNet-20 (0.27 M parameters). Images come channels last (N, H, W, C), as our
    loaders give them, unless `channels_last=False`."""

    def __init__(self, n: int = 3, classes: int = 10, channels: int = 3, width: int = 16, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, channels_in = [], width
        for stage in range(3):
            for i in range(n):
                out = width << stage
                blocks.append(_Block(channels_in, out, 2 if stage and i == 0 else 1))
                channels_in = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels_in, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2) if self.channels_last else x
        x = torch.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(classes: int = 10, channels: int = 3, channels_last: bool = True) -> nn.Module:
    return ResNetCifar(3, classes, channels, channels_last=channels_last)
