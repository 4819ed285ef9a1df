"""Hand-written small models with the graph shapes optimisation passes must handle.

These are the fastest entries in the zoo and have no dependency beyond torch, so
they are the default fixtures for pass tests: a plain chain (MLP), skip connections
(residual blocks), fan-out/concat (inception branch), and two models sharing a
prefix (cross-model common-subexpression elimination).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .registry import generator, register


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv -> BN -> ReLU, the pattern conv/BN folding and fusion passes look for."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def _randomize_bn_stats(module: nn.Module, seed: int) -> None:
    """Give BatchNorm non-trivial running stats and affine params.

    Fresh BN has mean 0 / var 1 / weight 1 / bias 0, which makes a wrong BN-folding
    pass look correct; random statistics make such bugs visible.
    """
    g = generator(seed + 1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


class TinyMLP(nn.Module):
    """A straight chain of Linear/activation layers: the simplest graph."""

    def __init__(
        self, in_features: int = 32, hidden: int = 64, out_features: int = 10
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection on the skip path when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: fan-out plus concat."""

    def __init__(self, cin: int, b1: int, b3: int, b5: int, bp: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(cin, b1, k=1)
        self.branch3 = nn.Sequential(
            _conv_bn_relu(cin, b3, k=1), _conv_bn_relu(b3, b3, k=3)
        )
        # The 5x5 receptive field as two 3x3 convs, as in Inception-v3.
        self.branch5 = nn.Sequential(
            _conv_bn_relu(cin, b5, k=1),
            _conv_bn_relu(b5, b5, k=3),
            _conv_bn_relu(b5, b5, k=3),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), _conv_bn_relu(cin, bp, k=1)
        )
        self.out_channels = b1 + b3 + b5 + bp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)],
            dim=1,
        )


class ResNetBlockCNN(nn.Module):
    """Stem + two residual stages + global pool + linear: a miniature ResNet."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class BranchyCNN(nn.Module):
    """Residual blocks, an inception-style concat, BN, max/avg pooling and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, width)
        self.res1 = BasicBlock(width, width)
        self.down = nn.MaxPool2d(2)
        self.inception = InceptionBlock(width, 8, 12, 4, 8)
        c = self.inception.out_channels
        self.bn = nn.BatchNorm2d(c)
        self.res2 = BasicBlock(c, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width, 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.res1(self.stem(x)))
        x = self.res2(torch.relu(self.bn(self.inception(x))))
        return self.head(self.pool(x))


def _image(
    batch_size: int, seed: int, size: int, channels: int = 3
) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, channels, size, size, generator=generator(seed)),)


@register("tiny_mlp", family="mlp", size="small", description="3-layer MLP, 32 -> 10")
def _tiny_mlp(
    *,
    batch_size: int,
    seed: int,
    in_features: int = 32,
    hidden: int = 64,
    num_classes: int = 10,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = TinyMLP(in_features, hidden, num_classes)
    return model, (torch.randn(batch_size, in_features, generator=generator(seed)),)


@register(
    "resnet_block_cnn",
    family="cnn",
    size="small",
    description="stem + 2 residual blocks",
)
def _resnet_block_cnn(
    *,
    batch_size: int,
    seed: int,
    image_size: int = 32,
    num_classes: int = 10,
    width: int = 16,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = ResNetBlockCNN(num_classes, width)
    _randomize_bn_stats(model, seed)
    return model, _image(batch_size, seed, image_size)


@register(
    "branchy_cnn", family="cnn", size="small", description="residual + inception concat"
)
def _branchy_cnn(
    *,
    batch_size: int,
    seed: int,
    image_size: int = 32,
    num_classes: int = 10,
    width: int = 16,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = BranchyCNN(num_classes, width)
    _randomize_bn_stats(model, seed)
    return model, _image(batch_size, seed, image_size)


class TwinTaskModel(nn.Module):
    """A frozen shared `prefix` followed by a task-specific `head`."""

    def __init__(self, prefix: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.prefix(x))


class SeparateInputs(nn.Module):
    """N models, model i on input i: one task with N inputs (NetFuse's setting for operator batching)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.models, xs))


def twin_tasks(
    *, batch_size: int = 1, seed: int = 0, image_size: int = 32
) -> tuple[dict[str, nn.Module], tuple[torch.Tensor, ...]]:
    """Two task models whose prefixes are equal in value but distinct objects.

    Cross-model CSE must discover the shared prefix by comparing weights, not by
    object identity, so the second prefix is a deep copy (equal tensors, different
    storage). Heads differ in structure: a 10-way classifier and a 4-d regressor
    that keeps spatial information a little longer.
    """
    torch.manual_seed(seed)
    prefix = nn.Sequential(
        _conv_bn_relu(3, 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
    )
    _randomize_bn_stats(prefix, seed)
    prefix.eval()
    for p in prefix.parameters():
        p.requires_grad_(False)
    head_a = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    head_b = nn.Sequential(
        _conv_bn_relu(32, 16),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    _randomize_bn_stats(head_b, seed + 7)
    models: dict[str, nn.Module] = {
        "classify": TwinTaskModel(prefix, head_a).eval(),
        "regress": TwinTaskModel(copy.deepcopy(prefix), head_b).eval(),
    }
    return models, _image(batch_size, seed, image_size)
