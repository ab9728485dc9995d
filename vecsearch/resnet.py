"""ResNet50 as torchvision builds it (same modules, names and initialisation), without its
classifier head, and without importing torchvision.

Importing torchvision.models costs about 3.5 s on a 2-core machine (its detection ops pull in
torch._dynamo), more than the network's forward for one image: `vecsearch search FILE` and the
web upload pay it on every start. State-dict keys match torchvision's, so its checkpoints load
as they are; tests/test_embed.py keeps the random initialisation equal to torchvision's.
Imported only by vecsearch/embed.py, when the network is built.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FEATURES = 2048
_CLASSES = 1000  # torchvision's ImageNet head: built only to draw the same random numbers


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """The 2048-d pooled features (torchvision's resnet50 with fc = identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, stride=2)
        self.layer4 = self._layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def for_weights() -> ResNet50:
    """The network with uninitialised parameters, to be filled by load_state_dict(assign=True):
    built on the meta device, so no time goes into a random initialisation that is overwritten."""
    with torch.device("meta"):
        return ResNet50()


def seeded(seed: int) -> ResNet50:
    """torchvision's resnet50(weights=None, zero_init_residual=True) under torch.manual_seed(seed),
    parameter for parameter (the caller's RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet50()
        head = torch.empty(_CLASSES, FEATURES)  # torchvision's nn.Linear draws these next
        nn.init.kaiming_uniform_(head, a=math.sqrt(5))
        nn.init.uniform_(torch.empty(_CLASSES), -1 / math.sqrt(FEATURES), 1 / math.sqrt(FEATURES))
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
    return model
