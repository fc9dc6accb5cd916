"""Spatial Group-wise Enhance (SGE) as an MMDetection plugin.

Li, Hu & Yang, "Spatial Group-wise Enhance: Improving Semantic Feature
Learning in Convolutional Networks", 2019. https://arxiv.org/abs/1905.09646
Official code: PytorchInsight, classification/models/imagenet/resnet_sge.py,
``SpatialGroupEnhance``.

Per group of ``in_channels // groups`` channels: the similarity of every
position's feature vector with the group's spatial mean, normalized over the
positions (minus the mean, divided by the unbiased standard deviation plus
1e-5), scaled and shifted by the group's ``weight`` and ``bias``, through a
sigmoid, multiplies the group's channels. It is PRM's global-context branch
alone (PRM's lambda and xi, same initial values: a fresh SGE gates every
position at sigmoid(1)).

Where the official code has no defined result, the rule is PRM's
(:func:`prm_det.ops.reference.normalize_over_positions`): a map of one
position normalizes to 0 (the official unbiased std of one value is NaN)
and a constant map to 0 with a zero gradient. The statistics are computed in
float32 at least, so float16/bfloat16 maps (autocast) cannot overflow in
the squared deviations; the output has the input's dtype.
"""
import torch
from torch import Tensor, nn

from prm_det.ops.gate_tail import (GateLogits, NormalizedMap,
                                   channel_moments, position_pool)
from prm_det.ops.reference import (_TINY_VAR, NORM_EPS,
                                  normalize_over_positions)

from ..registry import register_model
from .fused_tail import FusedGateTail


def sge_gate(x: Tensor, weight: Tensor, bias: Tensor, groups: int) -> Tensor:
    """SGE's gate for ``x`` [b, c, h, w]: [b, groups, h, w], one per
    (sample, group, position), in float32 at least."""
    b, c, h, w = x.shape
    stats = x.to(torch.promote_types(x.dtype, torch.float32))
    stats = stats.reshape(b, groups, c // groups, h * w)
    context = stats.mean(-1, keepdim=True)                 # [b, g, c/g, 1]
    similarity = (stats * context).sum(2)                  # [b, g, hw]
    normalized = normalize_over_positions(similarity, NORM_EPS)
    gate = torch.sigmoid(normalized * weight.reshape(1, groups, 1) +
                         bias.reshape(1, groups, 1))
    return gate.reshape(b, groups, h, w)


@register_model
class SGE(FusedGateTail, nn.Module):
    """Spatial Group-wise Enhance with ``in_channels`` first.

    Parameter names, shapes and initial values are the official code's
    (``weight`` zeros [1, g, 1, 1], ``bias`` ones [1, g, 1, 1]), so its
    checkpoints load without renaming.

    Args:
        in_channels (int): Channels of the input feature map.
        groups (int): Number of groups, each a contiguous block of
            ``in_channels // groups`` channels. Defaults to 64.
    """

    _abbr_ = 'sge'

    def __init__(self, in_channels: int, groups: int = 64) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f'SGE: groups must be a positive int, got '
                             f'{groups!r}')
        if in_channels % groups:
            raise ValueError(
                f'SGE: in_channels={in_channels} is not divisible by '
                f'groups={groups}; use a divisor of {in_channels} (for a '
                f'backbone: attention=dict(groups=...))')
        self.in_channels = in_channels
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        gate = sge_gate(x, self.weight, self.bias, self.groups)
        gated = x.reshape(b, self.groups, c // self.groups, h, w) * \
            gate.to(x.dtype)[:, :, None]                   # [b, g, c/g, h, w]
        return gated.reshape(b, c, h, w)

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        """The block's output: the similarities with the group means are
        pooled from the conv's output in one pass (the norm folded into the
        means)."""
        c = nmap.c
        b, ch, h, w = c.shape
        groups, acc = self.groups, nmap.alpha.dtype
        context = nmap.channel_mean()                        # [b, C]
        # S = sum over the group's channels of x * context: per position,
        # from one read of c (c * alpha * context + beta * context)
        mean, _ = position_pool(c, context * nmap.alpha, context * nmap.beta,
                                nmap.backend, groups=groups)
        similarity = mean * (ch // groups)                  # [b, g, hw]
        # the gate sigmoid(N(S) * weight + bias) as logits S with a per
        # (sample, group) affine: the op keeps S, not the gate
        # S's mean and M2 over the positions: the moments op again (one
        # read, an affine backward that keeps nothing new)
        similarity = similarity.view(b, groups, h, w)
        stats = channel_moments(similarity, nmap.backend)
        var = stats.m2 / max(h * w - 1, 1)  # unbiased; 0 at one position
        mean = stats.mean
        std = var.clamp_min(_TINY_VAR).sqrt()
        gain = self.weight.view(1, groups).to(acc) / (std + NORM_EPS)
        shift = self.bias.view(1, groups).to(acc) - mean * gain
        return nmap.finish(identity,
                           gate_logits=GateLogits(similarity, gain, shift))

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, groups={self.groups}'
