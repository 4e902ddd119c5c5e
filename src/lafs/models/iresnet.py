"""IResNet (improved ResNet, Duta et al. 2020) in the insightface ``arcface_torch`` layout (ArcFace, Deng et al. 2019).

Stem conv3x3(3, 64) -> BN -> PReLU; four stages of IBasicBlocks (BN -> conv3x3 -> BN -> PReLU ->
conv3x3(stride) -> BN, plus a 1x1 projection shortcut when the shape changes) at 64/128/256/512 channels,
each stage halving the resolution (112 -> 7; 56 -> 4); BN2d -> dropout -> flatten -> FC(512*7*7, 512) -> BN1d with a
frozen unit scale (the "features" layer). The same parameter names as insightface, so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dropout import Dropout
from .precision import cnn_precision

IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """``forward(images in [-1, 1]) -> {"embedding": B x embedding_size}``."""

    def __init__(
        self,
        depth: int = 50,
        img_size: int = 112,
        embedding_size: int = 512,
        dropout: float = 0.0,
        width: int = 64,
    ) -> None:
        super().__init__()
        if depth not in IRESNET_LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
        self.img_size = img_size
        self.embedding_size = embedding_size
        self.num_tokens = 0
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        layers = IRESNET_LAYERS[depth]
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = Dropout(dropout)
        side = img_size
        for _ in range(4):  # each stage: 3x3 conv, stride 2, padding 1
            side = (side + 1) // 2
        self.fc = nn.Linear(widths[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # insightface freezes the scale of the final BN so the embedding norm is learned by fc only.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with cnn_precision(images):  # fp32 convs under CPU autocast unless bf16 convs pay here (models/precision.py)
            x = self.prelu(self.bn1(self.conv1(images.float())))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = torch.flatten(self.bn2(x), 1)
        x = self.dropout(x)
        return {"embedding": self.features(self.fc(x))}
