"""Small versions of the architectures researchers bring (scripts/make_zoo.py
exports them): a torchvision-style ResNet-18, a MobileNetV2-style net, a ViT, a
text transformer encoder and an MLP-Mixer. Widths and depths are reduced so the
exported fixtures stay small; the operators are those of the full-size models."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_models


def BasicBlock(cin, cout, stride):
    """torchvision's BasicBlock: 1x1 strided projection on the shortcut."""
    return torch_models.BasicBlock(cin, cout, stride, shortcut_kernel=1)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (7x7/2 stem, 3x3/2 max-pool, [2, 2, 2, 2]
    BasicBlocks, adaptive average pool, fc) with narrow widths."""

    def __init__(self, widths=(4, 8, 8, 16), in_channels=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, ReLU6, depthwise 3x3, ReLU6, linear 1x1."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2's layout with few, narrow blocks; one grouped (not depthwise)
    and one dilated convolution added so both kinds are exercised."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
        )
        self.grouped = nn.Conv2d(12, 12, 3, 1, 2, dilation=2, groups=3, bias=True)
        self.head = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.hardswish(self.grouped(x))
        x = self.head(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with nn.MultiheadAttention and a GELU MLP."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: 4x4 patch embedding, class token, learned
    positions, pre-norm blocks, the class token's LayerNorm into the head."""

    def __init__(self, image=16, patch=4, dim=16, depth=2, heads=2, in_channels=3, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.2)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


class SdpaBlock(nn.Module):
    """Post-norm encoder block whose attention is F.scaled_dot_product_attention
    on heads split by reshape/transpose, with a tanh-GELU MLP."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = self.norm1(x + self.out(a))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class TextTransformer(nn.Module):
    """Token ids [B, S] (int64) -> embedding + learned positions -> encoder
    blocks (one with nn.MultiheadAttention, one with scaled_dot_product_attention)
    -> mean over the sequence -> classification head."""

    def __init__(self, vocab=50, seq=8, dim=16, heads=2, num_classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.2)
        self.block1 = EncoderBlock(dim, heads, 2 * dim)
        self.block2 = SdpaBlock(dim, heads, 2 * dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=1))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.SiLU(), nn.Linear(channel_hidden, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer: patch embedding, token- and channel-mixing MLPs, GroupNorm'd
    stem output, global mean, head."""

    def __init__(self, image=16, patch=4, dim=16, depth=2, in_channels=3, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, dim, patch, patch)
        self.stem_norm = nn.GroupNorm(4, dim)
        tokens = (image // patch) ** 2
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 2 * tokens, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem_norm(self.stem(x)).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class TinyUNet(nn.Module):
    """An encoder-decoder classifier: strided and dilated convolutions down,
    transposed convolutions (one grouped, one with output padding) back up, a
    skip concatenation, GroupNorm, average pooling."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.down = nn.Conv2d(in_channels, 8, 3, 2, 1)
        self.mid = nn.Conv2d(8, 8, 3, 1, 2, dilation=2)
        self.up = nn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1)
        self.up_grouped = nn.ConvTranspose2d(8, 8, 2, 2, groups=2, bias=False)
        self.norm = nn.GroupNorm(3, 4 + 8 + in_channels)
        self.head = nn.Linear((4 + 8 + in_channels) * 16, num_classes)

    def forward(self, x):
        h = torch.tanh(self.mid(F.elu(self.down(x))))
        z = self.norm(torch.cat([self.up(h), self.up_grouped(h), x], dim=1))
        z = F.avg_pool2d(F.leaky_relu(z, 0.1), 4)
        return self.head(z.flatten(1))


class CausalBlock(nn.Module):
    """Causal self-attention with a stored mask (`masked_fill(-inf)`) or with
    `scaled_dot_product_attention(is_causal=True)`, then a GELU MLP."""

    def __init__(self, dim, heads, seq, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("future", torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)).masked_fill(self.future, float("-inf"))
            a = scores.softmax(dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm(x))


class TinyGPT(nn.Module):
    """A decoder-only language model classifying from its last token: token and
    position embeddings, one masked-attention block, one causal-SDPA block."""

    def __init__(self, vocab=40, seq=8, dim=16, heads=2, num_classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(CausalBlock(dim, heads, seq, False), CausalBlock(dim, heads, seq, True))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.blocks(self.embed(tokens) + self.pos(positions))
        return self.head(x[:, -1])
