"""PyTorch definitions of hvp's built-in architectures (same names and math)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """The seed ResNet's block (3x3 strided shortcut); `shortcut_kernel=1` gives
    torchvision's 1x1 projection."""

    def __init__(self, cin, cout, stride, shortcut_kernel=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride, shortcut_kernel // 2, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    """The seed's CIFAR ResNet (`resnet-cifar:A,B,C`)."""

    def __init__(self, blocks, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        cin = 16
        for i, (n, cout) in enumerate(zip(blocks, (16, 32, 64))):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mlp(sizes):
    """`mlp:D,H1,...,C`: Linear-ReLU stack named 0, 2, 4, ..."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A small CNN exercising the ONNX operators beyond the ResNet's: constant
    arithmetic, Conv with bias, Sigmoid, MaxPool, LeakyRelu, Transpose, MatMul
    with a bare parameter, GELU, Tanh, Softmax, Mul, ReduceMean, Concat and a
    LogSoftmax output (log-probabilities are valid logits for the loss)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(6 * 3 * 3, 12) * 0.2)
        self.fc = nn.Linear(12 + 6, 10)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        h = F.max_pool2d(torch.sigmoid(self.conv1(x)), 2)
        h = F.max_pool2d(F.leaky_relu(self.conv2(h), 0.1), 2)
        pooled = h.mean(dim=(2, 3))
        z = F.gelu(h.transpose(2, 3).flatten(1) @ self.proj)
        z = torch.tanh(z) * torch.softmax(z, dim=1)
        return F.log_softmax(self.fc(torch.cat([z, pooled], dim=1)), dim=1)
