"""Architecture families of the development corpus (torch; the `train` extra only).

Four written here (plain CNN, VGG, ResNet, MLP), with the activation as a parameter, and
five taken from model libraries as their authors wrote them, at small widths so that the
corpus fits the repository: torchvision MobileNetV2, ShuffleNetV2 and DenseNet, timm
EfficientNet (SiLU, squeeze-excitation gates), ConvNeXt (channels-last blocks, LayerNorm,
GELU) and VisionTransformer (tokens, attention, GELU MLPs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "relu6": nn.ReLU6,  # exported as Clip
    "silu": nn.SiLU,
    "gelu": nn.GELU,  # exported as its Erf formula at opset 17
    "hardswish": nn.Hardswish,
}


def conv_bn(cin: int, cout: int, act: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         ACTIVATIONS[act]())


class PlainCNN(nn.Module):
    def __init__(self, channels: int, classes: int, act: str = "relu",
                 widths: tuple[int, ...] = (24, 48, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            conv_bn(channels, a, act), nn.MaxPool2d(2), conv_bn(a, b, act), nn.MaxPool2d(2),
            conv_bn(b, c, act), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c, 64), ACTIVATIONS[act](), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VGG(nn.Module):
    """Two convs per stage, no BatchNormalization (biases instead), a two-layer head."""

    def __init__(self, channels: int, classes: int, act: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for w in (16, 32, 48):
            layers += [nn.Conv2d(cin, w, 3, padding=1), ACTIVATIONS[act](),
                       nn.Conv2d(w, w, 3, padding=1), ACTIVATIONS[act](), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(cin, 96), ACTIVATIONS[act](),
                                  nn.Linear(96, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, channels: int, classes: int, act: str = "relu", side: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, 256), ACTIVATIONS[act](),
            nn.Linear(256, 128), ACTIVATIONS[act](), nn.Linear(128, 64), ACTIVATIONS[act](),
            nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, act, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(cout))
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, classes: int, act: str = "relu",
                 widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(channels, widths[0], act)]
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if (b == 0 and i > 0) else 1, act))
                cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class LibraryModel(nn.Module):
    """A library network behind a 1-to-3 channel repeat (grayscale data, RGB stems)."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.repeat = 3 // channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x)


def mobilenetv2(channels: int, classes: int, act: str = "relu6") -> nn.Module:
    from torchvision.models import mobilenet_v2
    net = mobilenet_v2(num_classes=classes, width_mult=0.35)
    # 32x32 inputs: a stride-1 stem leaves 2x2 for the last stage (at stride 2 it is 1x1,
    # and the net reached 22-50 % on shapes in 7 epochs)
    net.features[0][0].stride = (1, 1)
    net.classifier[0].p = 0.0
    return LibraryModel(net, channels)


def shufflenet(channels: int, classes: int, act: str = "relu") -> nn.Module:
    from torchvision.models import shufflenet_v2_x0_5
    net = shufflenet_v2_x0_5(num_classes=classes)
    net.maxpool = nn.Identity()  # 32x32 inputs: the stride-2 stem alone, 16x16 into stage 2
    return LibraryModel(net, channels)


def densenet(channels: int, classes: int, act: str = "relu") -> nn.Module:
    from torchvision.models import DenseNet
    net = DenseNet(growth_rate=12, block_config=(3, 3, 3), num_init_features=24, bn_size=2,
                   num_classes=classes)
    net.features.conv0 = nn.Conv2d(3, 24, 3, 2, 1, bias=False)
    net.features.pool0 = nn.Identity()  # 32x32 inputs: 16x16 into the first dense block
    return LibraryModel(net, channels)


def efficientnet(channels: int, classes: int, act: str = "silu") -> nn.Module:
    from timm.models.efficientnet import _gen_efficientnet
    net = _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.3,
                            pretrained=False, num_classes=classes, drop_rate=0.0)
    # 32x32 inputs: a stride-1 stem leaves 2x2 for the last stage (at stride 2 the net
    # reached 20-42 % on shapes in 7 epochs)
    net.conv_stem.stride = (1, 1)
    return LibraryModel(net, channels)


def convnext(channels: int, classes: int, act: str = "gelu") -> nn.Module:
    from timm.models.convnext import ConvNeXt
    net = ConvNeXt(in_chans=3, num_classes=classes, depths=(1, 1, 2, 1), dims=(24, 48, 64, 96),
                   patch_size=2, drop_path_rate=0.0,
                   # no layer scale: its 1e-6 start left the blocks untrained in a few
                   # hundred steps (5-53 % on shapes)
                   ls_init_value=None)
    return LibraryModel(net, channels)


def vit(channels: int, classes: int, act: str = "gelu", side: int = 32) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    net = VisionTransformer(img_size=side, patch_size=4, in_chans=3, num_classes=classes,
                            embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    return LibraryModel(net, channels)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "cnn": PlainCNN, "vgg": VGG, "mlp": MLP, "resnet": ResNet,
    "mobilenetv2": mobilenetv2, "shufflenet": shufflenet, "densenet": densenet,
    "efficientnet": efficientnet, "convnext": convnext, "vit": vit,
}
LIBRARY = {"mobilenetv2": "torchvision", "shufflenet": "torchvision", "densenet": "torchvision",
           "efficientnet": "timm", "convnext": "timm", "vit": "timm"}


class WithSoftmax(nn.Module):
    """Probabilities instead of logits at the output, as some exporters ship them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)
