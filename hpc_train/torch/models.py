"""Torch models shipped with hpc_train, as job-file factories (`[model] factory = "hpc_train.torch.models:resnet20"`).

Inputs arrive as our loaders give them: images (N, height, width, channels), float32; token
windows (N, T), integers.
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


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(n, t, width))


class _DecoderBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + MLP(norm(x)) (GPT-2's arrangement)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = _CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """A small decoder-only transformer over bytes (no tokenizer): embeddings of the 256 byte values
    and of positions, `layers` pre-norm blocks of causal self-attention and a 4x MLP, a final norm,
    and an output layer tied to the byte embedding (GPT-2's design at toy scale). Takes (N, T)
    integer windows, T <= context; returns (N, T, 256) next-byte logits."""

    def __init__(self, context: int = 256, width: int = 128, layers: int = 4, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(_DecoderBlock(width, heads, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.embed.weight
        for name, parameter in self.named_parameters():
            if parameter.dim() > 1:  # GPT-2's initialization: residual projections scaled by depth
                scale = (2 * layers) ** -0.5 if name.endswith(("out.weight", "mlp.2.weight")) else 1.0
                nn.init.normal_(parameter, std=0.02 * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.context:
            raise ValueError(f"windows of {length} bytes are longer than the model's context of {self.context}")
        x = self.embed(x.long()) + self.position(torch.arange(length, device=x.device))
        return self.head(self.norm(self.blocks(self.dropout(x))))
