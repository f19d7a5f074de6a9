"""The release's learned token poolers (arch specifier `attntv`, `conv`, `3dconv`), one per encoder, before its
projector. Features [B, T, H*W, C] in, tokens [B, T'*H'*W', C_out] out (frame-major), as the release's
`AttentivePooler`, `ConvolutionalProjector` and `Convolutional3DProjector` compute them (merv/util/nn_utils.py
177-377) without their projector, which the visual path runs (and fuses) itself.

Parameter names are the release's below `projectors.{e}.`, so its checkpoints load by name (model/release.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _frames(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, T, H*W, C] -> [B*T, C, H, W]."""
    b, t, n, c = x.shape
    return x.reshape(b * t, *grid, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------- attntv
class _CrossAttention(nn.Module):
    """Queries attend to the tokens (JEPA's cross-attention: one kv projection, scaled dot-product, out projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        h = self.heads
        q = self.q(q).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(x).view(b, x.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = _CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))  # only the tokens are normalised before the attention
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    """`attntv`: per frame, H'*W' learned queries (8 heads) attend to the frame's tokens: [B, T, N, C] ->
    [B, T*H'*W', C]. Initialised as the release does: truncated normal (std 0.02) for the queries and every Linear
    (its projector's included: the visual path re-initialises that), zero biases, and the attention's output and
    the MLP's second projection divided by sqrt(2)."""

    def __init__(self, dim: int, queries: int, heads: int = 8):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.empty(1, queries, dim))
        self.cross_attn = _CrossAttentionBlock(dim, heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query_tokens.is_meta:
            return
        nn.init.trunc_normal_(self.query_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear_jepa(m)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.cross_attn.xattn.proj.weight.div_(math.sqrt(2.0))
            self.cross_attn.mlp.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, n, c = x.shape
        q = self.query_tokens.expand(b * t, -1, -1)
        q = self.cross_attn(q, x.reshape(b * t, n, c))
        return q.reshape(b, -1, c)


def init_linear_jepa(m: nn.Linear) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- conv (C-Abstractor)
class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [N, C, H, W], then an activation (timm's LayerNormAct2d)."""

    def __init__(self, channels: int, act: bool):
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class _ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = _LayerNorm2d(cout, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class _Bottleneck(nn.Module):
    """timm's RegNet bottleneck as the C-Abstractor configures it: bottleneck ratio 1, depthwise 3x3 (group size 1),
    squeeze-excite at 1/4 of the input width, SiLU, channel LayerNorm, a 1x1 conv + norm shortcut where widths
    differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _ConvNormAct(cin, cout, 1)
        self.conv2 = _ConvNormAct(cout, cout, 3, groups=cout)
        self.se = _SqueezeExcite(cout, int(round(cin * 0.25)))
        self.conv3 = _ConvNormAct(cout, cout, 1, act=False)
        self.downsample = _ConvNormAct(cin, cout, 1, act=False) if cin != cout else nn.Identity()
        self.act3 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + self.downsample(x))


class _RegStage(nn.Sequential):
    def __init__(self, depth: int, cin: int, cout: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", _Bottleneck(cin if i == 0 else cout, cout))


class ConvAbstractor(nn.Module):
    """`conv`: Honeybee's C-Abstractor per frame: RegStage (3 blocks, C -> D), adaptive average pooling to H'xW',
    RegStage (3 blocks, D -> D): [B, T, N, C] -> [B, T*H'*W', D]."""

    def __init__(self, dim: int, out_dim: int, size: tuple[int, int], depth: int = 3):
        super().__init__()
        self.convolution_pooling = nn.Sequential(_RegStage(depth, dim, out_dim), nn.AdaptiveAvgPool2d(size),
                                                 _RegStage(depth, out_dim, out_dim))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t = x.shape[:2]
        y = self.convolution_pooling(_frames(x, grid))  # [B*T, D, H', W']
        return y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])


# ----------------------------------------------------------------------------------------------- 3dconv
class Conv3dPooler(nn.Module):
    """`3dconv`: Conv3d (kernel 3, padding 1, C -> D) over [C, T, H, W], then AdaptiveAvgPool3d to (T', H', W')."""

    def __init__(self, dim: int, out_dim: int, size: tuple[int, int, int]):
        super().__init__()
        self.convolution_pooling = nn.Sequential(nn.Conv3d(dim, out_dim, kernel_size=3, padding=1),
                                                 nn.AdaptiveAvgPool3d(size))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, n, c = x.shape
        y = self.convolution_pooling(x.reshape(b, t, *grid, c).permute(0, 4, 1, 2, 3))
        return y.flatten(2).transpose(1, 2)


def build_pooler(kind: str, dim: int, llm_dim: int, grid_out: tuple[int, int, int]) -> nn.Module:
    """The learned pooler for arch keyword `kind`; `grid_out` is its (T', H', W')."""
    if kind == "attntv":
        return AttentivePooler(dim, grid_out[1] * grid_out[2])
    if kind == "conv":
        return ConvAbstractor(dim, llm_dim, grid_out[1:])
    if kind == "3dconv":
        return Conv3dPooler(dim, llm_dim, grid_out)
    raise ValueError(f"no learned pooler {kind!r}")
