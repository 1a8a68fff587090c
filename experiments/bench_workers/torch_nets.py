"""LeNet-5, AlexNet-lite and FCN in plain PyTorch eager: the networks cnnlab is compared against.

The same layers as cnnlab's presets (conf/model/lenet5.yaml, conf/model/alexnet_lite.yaml,
conf/model/fcn.yaml, built by cnnlab/models/), in PyTorch's NCHW (images) and NCL (series)
layouts, and initialised like Flax's defaults (LeCun normal kernels truncated at two standard
deviations, zero biases), so that both start from the same distribution and time to accuracy
compares like with like. tests/test_bench.py pins the parameter counts to cnnlab's. Flax pools
with VALID padding, as `nn.MaxPool2d` does by default.

Glossary: `B` batch, `C` channels, `H, W` spatial, `L` length, `K` classes.
"""

import math

import torch
from torch import nn


class LeNet5(nn.Module):
    """C1 conv 5x5 (6, padding 2) -> max 2/2 -> C3 conv 5x5 (16) -> max 2/2 -> 120 -> 84 -> K."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        h, w, c = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),  # [B, 6, 14, 14]
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),  # [B, 16, 5, 5]
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),  # [B, 400] on 28x28 inputs
            nn.Linear(_flat_size(self.features, c, h, w), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),  # [B, K], the softmax is in the loss
        )  # fmt: skip
        init_like_flax(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, K]
        return self.classifier(self.features(x))


class AlexNetLite(nn.Module):
    """Five "same" convs (24, 64, 96, 96, 64; kernels 5, 5, 3, 3, 3) with 3x3/2 max pools after
    the first, second and last, then dropout 0.5 before each of two dense 512 layers."""

    widths = (24, 64, 96, 96, 64)
    kernels = (5, 5, 3, 3, 3)
    pooled = (True, True, False, False, True)

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        h, w, c = image_shape
        layers: list[nn.Module] = []
        for width, k, pool in zip(self.widths, self.kernels, self.pooled, strict=True):
            layers += [nn.Conv2d(c, width, k, padding=k // 2), nn.ReLU()]  # stride 1: "same"
            if pool:
                layers.append(nn.MaxPool2d(3, 2))  # 32 -> 15 -> 7 -> 3
            c = width
        self.features = nn.Sequential(*layers)  # [B, 64, 3, 3] on 32x32 inputs
        self.classifier = nn.Sequential(
            nn.Flatten(),  # [B, 576]
            nn.Dropout(0.5), nn.Linear(_flat_size(self.features, image_shape[2], h, w), 512),
            nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, num_classes),  # [B, K]
        )  # fmt: skip
        init_like_flax(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, K]
        return self.classifier(self.features(x))


class FCN(nn.Module):
    """Wang et al. (2017) on series: convs 128, 256, 128 with kernels 8, 5, 3, "same" padding
    (an even kernel pads 3 before and 4 after, as XLA and Keras do), each followed by BatchNorm
    and ReLU, then the mean over time and the logits."""

    widths = (128, 256, 128)
    kernels = (8, 5, 3)

    def __init__(self, series_shape: tuple[int, int], num_classes: int):
        super().__init__()
        if len(series_shape) != 2:
            raise ValueError(f"the PyTorch FCN takes series (L, C), not {series_shape}")
        c = series_shape[1]
        layers: list[nn.Module] = []
        for width, k in zip(self.widths, self.kernels, strict=True):
            # Flax's BatchNorm: running averages kept at 0.9, so PyTorch's momentum is 0.1
            layers += [nn.Conv1d(c, width, k, padding="same"), nn.BatchNorm1d(width, momentum=0.1)]
            layers.append(nn.ReLU())
            c = width
        self.features = nn.Sequential(*layers)  # [B, 128, L]
        self.classifier = nn.Linear(c, num_classes)  # [B, K]
        init_like_flax(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, K]
        return self.classifier(self.features(x).mean(dim=2))  # global average pooling


NETS = {"lenet5": LeNet5, "alexnet_lite": AlexNetLite, "fcn": FCN}  # keyed by cnnlab's model.name


def _flat_size(features: nn.Module, c: int, h: int, w: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, c, h, w)).numel()


def init_like_flax(net: nn.Module) -> None:
    """Flax's defaults: kernels LeCun normal (variance 1 / fan_in, truncated at 2 standard
    deviations and rescaled to keep that variance, as jax.nn.initializers does), biases zero."""
    for m in net.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()  # in_channels * kernel area, or in_features
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
