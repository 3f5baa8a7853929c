"""Small reference models for CPU training benchmarks: a ResNet-18-style CNN for 32x32 images and
a deep MLP with batch norm (no torchvision needed).

Every batch norm that a ReLU follows sits in an ``nn.Sequential`` directly before an
``nn.ReLU``, so :func:`optcore.torch.convert_batchnorm` with ``fuse_relu=True`` fuses the
pair.
"""
from torch import nn

__all__ = ["BasicBlock", "ResNet18", "MLP"]


def _conv_bn(c_in, c_out, stride=1, kernel=3):
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """The residual block of ResNet-18 (He et al. 2016): two 3x3 convolutions with batch norm,
    ``relu(branch(x) + shortcut(x))``, the shortcut a 1x1 convolution with batch norm when the
    stride or the channel count changes.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the first convolution (and of the shortcut).

    References
    ----------
    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.branch = nn.Sequential(*_conv_bn(c_in, c_out, stride), nn.ReLU(inplace=True),
                                    *_conv_bn(c_out, c_out))
        self.shortcut = (nn.Sequential(*_conv_bn(c_in, c_out, stride, kernel=1))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        """``relu(branch(x) + shortcut(x))``."""
        return self.relu(self.branch(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (the CIFAR variant): a 3x3 stem, four stages of two
    :class:`BasicBlock` with ``width * (1, 2, 4, 8)`` channels (64-128-256-512 by default),
    strides 1, 2, 2, 2, global average pooling and a linear classifier.

    Parameters
    ----------
    num_classes : int, default 10
    width : int, default 64
        Channels of the first stage (smaller for quick tests).
    """

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(*_conv_bn(3, width), nn.ReLU(inplace=True))
        blocks, c = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(c, w, stride), BasicBlock(w, w)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        """Class scores of a batch of ``(N, 3, H, W)`` images."""
        return self.head(self.blocks(self.stem(x)))


class MLP(nn.Sequential):
    """``depth`` x (Linear ``width`` + BatchNorm1d + ReLU), then a linear classifier.

    Parameters
    ----------
    in_features : int, default 512
    width : int, default 512
    depth : int, default 8
    num_classes : int, default 10
    """

    def __init__(self, in_features=512, width=512, depth=8, num_classes=10):
        layers, c = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(c, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            c = width
        super().__init__(*layers, nn.Linear(c, num_classes))
