"""GCNet's global context block: mmcv's ``ContextBlock``, initialized as
GCNet specifies inside a backbone.

Cao, Xu, Lin, Wei & Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation
Networks and Beyond", ICCV 2019 workshops. https://arxiv.org/abs/1904.11492

mmcv's ``ContextBlock`` zero-initializes its transform's last conv (a fresh
block adds nothing: the residual block starts as it was) in
``reset_parameters()``, at construction. mmdet's ResNet then runs its own
``init_cfg`` (Kaiming over every Conv2d) and calls ``init_weights()`` of the
children that have one, which ``ContextBlock`` has not: inside a backbone
its last conv ended Kaiming-initialized. ``GC`` is ``ContextBlock`` with
``init_weights()`` = ``reset_parameters()`` and GCNet's defaults; its
tensors and names are ``ContextBlock``'s (``context_block.*``).
"""
from typing import Sequence

import torch
from mmcv.cnn import ContextBlock
from torch import Tensor

from prm_det.ops.gate_tail import NormalizedMap, position_pool

from ..registry import register_model
from .fused_tail import FusedGateTail, on_vectors


@register_model
class GC(FusedGateTail, ContextBlock):
    """mmcv's ``ContextBlock`` keeping its initialization in a backbone.

    Args:
        in_channels (int): Channels of the input feature map.
        ratio (float): Hidden channels of the transform are
            ``int(in_channels * ratio)``. Defaults to 1/16.
        pooling_type (str): 'att' (GCNet) or 'avg'. Defaults to 'att'.
        fusion_types (Sequence[str]): 'channel_add' (GCNet) and/or
            'channel_mul'. Defaults to ('channel_add', ).
    """

    def __init__(self, in_channels: int, ratio: float = 1. / 16,
                 pooling_type: str = 'att',
                 fusion_types: Sequence[str] = ('channel_add', )) -> None:
        super().__init__(in_channels, ratio, pooling_type=pooling_type,
                         fusion_types=tuple(fusion_types))

    def init_weights(self) -> None:
        """mmcv's initialization (run again after a backbone's own)."""
        self.reset_parameters()

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        """The block's output: the attention pooling's logits and context
        come from the conv's output (the norm folded into the mask's
        weights, and out of the context: the softmax weights sum to 1)."""
        if self.pooling_type == 'att':
            context = self._attention_context(nmap)
        else:
            context = nmap.channel_mean()
        scale = shift = None
        if self.channel_mul_conv is not None:
            scale = torch.sigmoid(on_vectors(self.channel_mul_conv, context))
        if self.channel_add_conv is not None:
            shift = on_vectors(self.channel_add_conv, context)
        return nmap.finish(identity, channel_scale=scale,
                           channel_shift=shift)

    def _attention_context(self, nmap: NormalizedMap) -> Tensor:
        """sum over positions of softmax(conv_mask(x)) * x, [b, C]: the
        logits pooled from c in one pass (the norm folded into the mask's
        weights), the context one matmul."""
        c = nmap.c
        b, ch = c.shape[:2]
        acc = nmap.alpha.dtype
        mask_weight = self.conv_mask.weight.flatten().to(acc)
        scale = (mask_weight * nmap.alpha).expand(b, -1)
        shift = (mask_weight * nmap.beta).expand(b, -1)
        mean, _ = position_pool(c, scale, shift, nmap.backend)
        logits = mean * ch                                    # [b, 1, hw]
        if self.conv_mask.bias is not None:
            logits = logits + self.conv_mask.bias.to(acc)
        attention = torch.softmax(logits, dim=-1)
        pooled = torch.matmul(c.flatten(2), attention.to(c.dtype).transpose(
            1, 2))                                            # [b, C, 1]
        return pooled.flatten(1).to(acc) * nmap.alpha + nmap.beta
