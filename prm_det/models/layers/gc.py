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

from mmcv.cnn import ContextBlock

from ..registry import register_model


@register_model
class GC(ContextBlock):
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
