"""Small backbones for few-shot learning that work with ``torch.func`` (``functional_call`` + ``vmap``).

Both networks are *stateless*: no module keeps running statistics, so a forward pass is a pure function of
the parameters and the input, which is what :class:`~lightning_metaif.meta.maml.MAML` needs to ``vmap`` the
inner loop over a batch of tasks.

Normalisation in :class:`ConvNet` (``norm=``):

* ``"none"`` (default): conv → ReLU → max-pool. Non-transductive: a query sample's prediction depends only
  on that sample, so giving a sample weight 0 is exactly the same as removing it (what instance influence
  assumes).
* ``"group"``: ``GroupNorm`` per sample, also non-transductive.
* ``"batch"``: ``BatchNorm2d(track_running_stats=False)``: batch statistics in training *and* evaluation,
  as in the original MAML code (transductive: the statistics of the support / query batch enter every
  prediction, so a weight-0 sample still moves the others). ``vmap`` handles it (statistics per task).
  A ``BatchNorm`` *with* running statistics updates buffers in place and cannot be ``vmap``-ed; ``MAML``
  rejects it with an error that says how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

_NORMS = ("none", "group", "batch")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "group":
        groups = max(1, min(8, channels // 4))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    return nn.BatchNorm2d(channels, track_running_stats=False)


class ConvNet(nn.Module):
    """The "Conv-4" few-shot backbone: ``layers`` × (3×3 conv → norm → ReLU → 2×2 max-pool) → linear head.

    The number of blocks is reduced automatically so that the feature map never shrinks below 1×1
    (8×8 digits get 3 blocks, 28×28 Omniglot 4, 84×84 mini-ImageNet 4 with a 5×5 map). Inputs may be
    images ``[n, C, H, W]`` or flat vectors ``[n, C*H*W]`` (reshaped to square images). The last module,
    ``head``, is the ``nn.Linear`` classifier that ANIL adapts by default.

    Args:
        in_channels: image channels (1 for digits / Omniglot, 3 for mini-ImageNet).
        num_classes: outputs (the number of ways N).
        hidden: channels of every conv block.
        layers: conv blocks before the automatic reduction.
        image_size: side of the (square) input images.
        norm: ``"none"``, ``"group"`` or ``"batch"`` (batch statistics only; see the module docstring).

    Example:
        >>> import torch
        >>> net = ConvNet(1, 5, hidden=8, image_size=8)
        >>> net.num_blocks, net(torch.randn(3, 64)).shape
        (3, torch.Size([3, 5]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 32,
        layers: int = 4,
        image_size: int = 28,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}.")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"ConvNet {name} must be a positive integer, got {value}.")
        if layers < 1 or image_size < 2:
            raise ValueError(f"ConvNet needs layers >= 1 and image_size >= 2, got {layers} and {image_size}.")
        self.in_channels, self.image_size = in_channels, image_size
        self.num_blocks = min(layers, int(math.floor(math.log2(image_size))))
        blocks, channels, size = [], in_channels, image_size
        for _ in range(self.num_blocks):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                _norm_layer(norm, hidden),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, size // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = hidden * size * size
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        elif x.dim() == 3:  # [n, H, W] single-channel images
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class MLP(nn.Module):
    """A ReLU multilayer perceptron (the sinusoid-regression backbone of the MAML paper: 1 → 40 → 40 → 1).

    The last layer, ``head``, is an ``nn.Linear`` (what ANIL adapts by default).

    Example:
        >>> import torch
        >>> MLP(1, 1)(torch.randn(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"MLP dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}, hidden={hidden}."
            )
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
