"""Gather-Excite without parameters (GE-theta-minus, global extent) as an
MMDetection plugin.

Hu, Shen, Albanie, Sun & Vedaldi, "Gather-Excite: Exploiting Feature Context
in Convolutional Neural Networks", NeurIPS 2018.
https://arxiv.org/abs/1810.12348

The gather is the mean over every position (global extent), the excite a
sigmoid of it, with no parameters: ``x * sigmoid(mean over h, w of x)``.
This is the PRM paper's GE-ResNet50 row (25.557M parameters: ResNet-50's).
The mean is taken in float32 at least under autocast; the output has the
input's dtype.
"""
import torch
from torch import Tensor, nn

from prm_det.ops.gate_tail import NormalizedMap

from ..registry import register_model
from .fused_tail import FusedGateTail


@register_model
class GE(FusedGateTail, nn.Module):
    """Parameter-free gather-excite over the whole map.

    Args:
        in_channels (int): Channels of the input feature map (kept for the
            plugin contract; the module has no parameters).
    """

    _abbr_ = 'ge'

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        context = x.mean((2, 3), keepdim=True,
                         dtype=torch.promote_types(x.dtype, torch.float32))
        return x * torch.sigmoid(context).to(x.dtype)     # [b, c, 1, 1] gate

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        """The block's output: the gather is the normalized map's channel
        mean."""
        return nmap.finish(identity,
                           channel_scale=torch.sigmoid(nmap.channel_mean()))

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}'
