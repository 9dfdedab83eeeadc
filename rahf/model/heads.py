"""Prediction heads. Each takes the fused image tokens as a feature map of shape (B, C, h, w)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeatmapHeadConfig, ScoreHeadConfig


class _RMSNormLastDim(torch.autograd.Function):
    """RMS norm over the last dimension of a contiguous (..., C) tensor, with a hand-written backward:
    it saves only the input and the per-row 1/rms (autograd through the composite saves several
    full-size intermediates) and makes fewer passes over memory (the heads are memory-bound on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        c = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(c).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd  # (..., C)
        gw = g * weight
        dw = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        # dx = rstd * (gw - xhat * mean_c(gw * xhat))
        dot = (gw * xhat).mean(-1, keepdim=True)
        dx = gw.sub_(xhat.mul_(dot)).mul_(rstd)
        return dx, dw, None


class ChannelRMSNorm(nn.Module):
    """T5-style RMS norm over the channel dimension of a (B, C, H, W) map (no mean subtraction)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # channels-last: the channels are the innermost dimension, so the fused rms_norm kernel
            # normalises a contiguous (B, H, W, C) view (one pass, fewer saved intermediates)
            y = _RMSNormLastDim.apply(x.permute(0, 2, 3, 1).float(), self.weight.float(), self.eps)
            return y.to(x.dtype).permute(0, 3, 1, 2)
        var = x.float().pow(2).mean(dim=1, keepdim=True)
        x = (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1).to(x.dtype)


def conv_norm_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), ChannelRMSNorm(cout), nn.ReLU(inplace=True))


class ResidualPair(nn.Module):
    """Two 3×3 conv + RMS-norm layers with a skip connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = ChannelRMSNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(x + y)


class UpStage(nn.Module):
    """3×3 transposed conv, stride 2 (×2 resolution) → norm/ReLU → residual pair."""

    def __init__(self, cin: int, cout: int, residual: bool = True):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.norm = ChannelRMSNorm(cout)
        self.block = ResidualPair(cout) if residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.relu(self.norm(self.up(x))))


class HeatmapHead(nn.Module):
    """(B, C, h, w) features → (B, h·2^k·u, w·2^k·u) heatmap in [0, 1].

    conv stem (``stem_channels``) → k = len(``up_channels``) stride-2 deconv stages → 3×3 conv →
    3×3 conv to 1 channel → optional bilinear ×``upsample`` of the logits → sigmoid.
    """

    def __init__(self, in_channels: int, cfg: HeatmapHeadConfig):
        super().__init__()
        layers, c = [], in_channels
        for s in cfg.stem_channels:
            layers.append(conv_norm_relu(c, s))
            c = s
        self.stem = nn.Sequential(*layers)
        ups = []
        for u in cfg.up_channels:
            ups.append(UpStage(c, u, cfg.residual))
            c = u
        self.up = nn.Sequential(*ups)
        self.out = nn.Sequential(nn.Conv2d(c, cfg.final_channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(cfg.final_channels, 1, 3, padding=1))
        self.upsample = cfg.upsample
        self.channels_last = True  # run the convs on NHWC activations (weights keep their layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.out(self.up(self.stem(x)))  # (B, 1, H', W')
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return torch.sigmoid(x.float()).squeeze(1)  # (B, H, W)


class ScoreHead(nn.Module):
    """(B, C, h, w) features → (B,) score in [0, 1]: 3×3 convs → flatten → MLP → sigmoid."""

    def __init__(self, in_channels: int, grid: int, cfg: ScoreHeadConfig):
        super().__init__()
        chans = cfg.channels or tuple(max(1, in_channels // d) for d in (1, 2, 4, 8, 16, 64))
        layers, c = [], in_channels
        for ch in chans:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(inplace=True)]
            c = ch
        self.convs = nn.Sequential(*layers)
        mlp, d = [], c * grid * grid
        for m in cfg.mlp:
            mlp += [nn.Linear(d, m), nn.ReLU(inplace=True)]
            d = m
        mlp.append(nn.Linear(d, 1))
        self.mlp = nn.Sequential(*mlp)
        self.channels_last = True

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The score before the sigmoid, (B,)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.convs(x).contiguous().flatten(1)  # (B, c·h·w), NCHW order whatever the memory format
        return self.mlp(x).float().squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))  # (B,)
