"""The release's visual path written out step by step from its code (merv/models/vidlms/merv.py:152-227, 562-612 and
merv/util/nn_utils.py), reading the parameters of our `VisualPath` through the release's own names
(`model.release.release_names`), so that tests and benchmarks compare our modules with the release's computation,
not with themselves. Plain torch, unfused: every P_e is materialised, as in the release."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from merv_fast.arch import parse_arch
from merv_fast.model.release import visual_release_name


def release_params(visual) -> dict[str, torch.Tensor]:
    """The visual path's parameters under the release's flat keys."""
    return {visual_release_name("visual." + n, visual.spec, visual.fusion_kind): p
            for n, p in visual.named_parameters()}


def _mlp(x: torch.Tensor, p: dict, prefix: str, projector: str) -> torch.Tensor:
    """get_mlp_projector's module on x (nn_utils.py:111-121): Linear layers at Sequential indices 0, 2, 4 with exact
    GELU between them."""
    if projector == "none":
        return x
    if projector == "linear":
        return F.linear(x, p[f"{prefix}.weight"], p[f"{prefix}.bias"])
    layers = (0, 2) if projector == "gelu-mlp" else (0, 2, 4)
    for i, idx in enumerate(layers):
        x = F.linear(x, p[f"{prefix}.{idx}.weight"], p[f"{prefix}.{idx}.bias"])
        if i < len(layers) - 1:
            x = F.gelu(x)
    return x


def _attntv(x: torch.Tensor, p: dict, pre: str) -> torch.Tensor:
    """AttentivePooler (nn_utils.py:177-246) without its projector: x [B*F, N, C] -> [B*F, Q, C]."""
    bf, n, c = x.shape
    q = p[f"{pre}.query_tokens"].expand(bf, -1, -1)
    heads = 8
    xn = F.layer_norm(x, (c,), p[f"{pre}.cross_attn.norm1.weight"], p[f"{pre}.cross_attn.norm1.bias"])
    qh = F.linear(q, p[f"{pre}.cross_attn.xattn.q.weight"], p[f"{pre}.cross_attn.xattn.q.bias"])
    kv = F.linear(xn, p[f"{pre}.cross_attn.xattn.kv.weight"], p[f"{pre}.cross_attn.xattn.kv.bias"])
    qh = qh.reshape(bf, -1, heads, c // heads).permute(0, 2, 1, 3)
    kv = kv.reshape(bf, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (qh @ kv[0].transpose(-2, -1)) * (c // heads) ** -0.5  # the release's non-sdpa branch, same function
    y = (scores.softmax(-1) @ kv[1]).transpose(1, 2).reshape(bf, -1, c)
    q = q + F.linear(y, p[f"{pre}.cross_attn.xattn.proj.weight"], p[f"{pre}.cross_attn.xattn.proj.bias"])
    h = F.layer_norm(q, (c,), p[f"{pre}.cross_attn.norm2.weight"], p[f"{pre}.cross_attn.norm2.bias"])
    h = F.linear(F.gelu(F.linear(h, p[f"{pre}.cross_attn.mlp.fc1.weight"], p[f"{pre}.cross_attn.mlp.fc1.bias"])),
                 p[f"{pre}.cross_attn.mlp.fc2.weight"], p[f"{pre}.cross_attn.mlp.fc2.bias"])
    return q + h


def _conv_norm_act(x, p, pre, groups=1, act=True):
    """timm's ConvNormAct with the C-Abstractor's LayerNorm2d: bias-free conv (padding k // 2), LayerNormAct2d over
    channels (its eps 1e-5, not LayerNorm2d's 1e-6: timm maps the norm type to its norm+act class), SiLU."""
    w = p[f"{pre}.conv.weight"]
    x = F.conv2d(x, w, padding=w.shape[-1] // 2, groups=groups)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), p[f"{pre}.bn.weight"], p[f"{pre}.bn.bias"], 1e-5)
    x = x.permute(0, 3, 1, 2)
    return F.silu(x) if act else x


def _regstage(x, p, pre, depth=3):
    """timm's RegStage of RegNet Bottlenecks (models/regnet.py) as Honeybee's C-Abstractor configures it: bottleneck
    ratio 1, group size 1 (depthwise 3x3), squeeze-excite (fc1, SiLU, fc2, sigmoid) after conv2, a 1x1 conv + norm
    shortcut where the width changes, SiLU after the residual add."""
    for i in range(1, depth + 1):
        b = f"{pre}.b{i}"
        y = _conv_norm_act(x, p, f"{b}.conv1")
        y = _conv_norm_act(y, p, f"{b}.conv2", groups=y.shape[1])
        s = F.conv2d(y.mean((2, 3), keepdim=True), p[f"{b}.se.fc1.weight"], p[f"{b}.se.fc1.bias"])
        s = F.conv2d(F.silu(s), p[f"{b}.se.fc2.weight"], p[f"{b}.se.fc2.bias"])
        y = _conv_norm_act(y * s.sigmoid(), p, f"{b}.conv3", act=False)
        shortcut = _conv_norm_act(x, p, f"{b}.downsample", act=False) if f"{b}.downsample.conv.weight" in p else x
        x = F.silu(y + shortcut)
    return x


def release_visual(visual, cfg, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """features [B, T, H*W, C] per encoder -> (tokens, mix weights or None), as the release computes them."""
    spec = parse_arch(cfg.visual.arch)
    p = release_params(visual)
    projected = []
    for e, (f, enc) in enumerate(zip(features, cfg.encoders)):
        b, t, n, c = f.shape
        h = w = int(math.isqrt(n))
        t_out, h_out, w_out = cfg.token_grid(enc)
        pre = f"projectors.{e}"
        mlp = f"{pre}.projector.projector" if spec.pooling else f"{pre}.projector"
        if spec.pooling is None:  # merv.py:165-172: the projector on every token
            x = f.reshape(b, t * n, c)
        elif spec.pooling == "3davg":  # AveragePooling3DProjector: AdaptiveAvgPool3d on [B, C, F, H, W]
            x = F.adaptive_avg_pool3d(f.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3), (t_out, h_out, w_out))
            x = x.flatten(2).transpose(1, 2)
        elif spec.pooling == "avg":  # AveragePoolingProjector: AdaptiveAvgPool2d per frame
            x = F.adaptive_avg_pool2d(f.reshape(b * t, h, w, c).permute(0, 3, 1, 2), (h_out, w_out))
            x = x.flatten(2).transpose(1, 2).reshape(b, t * h_out * w_out, c)
        elif spec.pooling == "attntv":
            x = _attntv(f.reshape(b * t, n, c), p, pre).reshape(b, -1, c)
        elif spec.pooling == "3dconv":  # Convolutional3DProjector: Conv3d(k=3, pad=1), AdaptiveAvgPool3d
            y = F.conv3d(f.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3), p[f"{pre}.convolution_pooling.0.weight"],
                         p[f"{pre}.convolution_pooling.0.bias"], padding=1)
            x = F.adaptive_avg_pool3d(y, (t_out, h_out, w_out)).flatten(2).transpose(1, 2)
        else:  # conv: ConvolutionalProjector per frame: RegStage, AdaptiveAvgPool2d, RegStage
            y = _regstage(f.reshape(b * t, h, w, c).permute(0, 3, 1, 2), p, f"{pre}.convolution_pooling.0")
            y = _regstage(F.adaptive_avg_pool2d(y, (h_out, w_out)), p, f"{pre}.convolution_pooling.2")
            x = y.flatten(2).transpose(1, 2).reshape(b, t * h_out * w_out, -1)
        projected.append(_mlp(x, p, mlp, spec.projector))
    kind = cfg.visual.fusion
    if kind == "first":
        return projected[0], None
    if kind == "concat":
        return torch.cat(projected, 1), None
    if kind in ("concat_channel", "concat_channel_ln"):
        x = torch.cat(projected, -1)
        if kind == "concat_channel_ln":
            x = F.layer_norm(x, (x.shape[-1],), p["feature_fusion.0.weight"], p["feature_fusion.0.bias"])
            return F.linear(x, p["feature_fusion.1.projector.weight"], p["feature_fusion.1.projector.bias"]), None
        return F.linear(x, p["feature_fusion.projector.weight"], p["feature_fusion.projector.bias"]), None
    # cross_attention_avg_lq (nn_utils.py:455-521): nn.MultiheadAttention, one head, keys = token means of P_e
    v = torch.stack(projected, 1)  # [B, E, L, D]
    keys = v.mean(2)
    embed = p["feature_fusion.Q"].shape[-1]
    in_b = p["feature_fusion.attention.in_proj_bias"]
    q = F.linear(p["feature_fusion.Q"], p["feature_fusion.attention.q_proj_weight"], in_b[:embed])
    k = F.linear(keys, p["feature_fusion.attention.k_proj_weight"], in_b[embed:2 * embed])
    mix = ((k @ q.T).squeeze(-1) / math.sqrt(embed)).softmax(-1)
    return torch.einsum("be,beld->bld", mix, v), mix
