"""MnasNet with an attention module in every inverted residual block.

The PRM paper applies PRM to MnasNet (ImageNet top-1 71.72 -> 73.01,
0.330 -> 0.331 GFLOPs, 4.38M parameters). As in its ResNets and in
PRM-MobileNetV2 (``attention_mobilenet_v2.py``, whose block, head sizing
and checked pretrained load this reuses), the attention sits at the end of
each inverted residual's branch: after the linear 1x1 projection and its
norm, before the shortcut add (blocks without a shortcut carry it too).
The 16 inverted residuals of ``layer2`` to ``layer7`` have one; the
separable conv of ``layer1`` (MnasNet's SepConv, no expansion, no
shortcut) has none.
"""
from ..registry import register_model
from .attention_mobilenet_v2 import InvertedResidualAttention
from .mnasnet import MnasNet


@register_model
class AttentionMnasNet(InvertedResidualAttention, MnasNet):
    """prm_det's :class:`MnasNet` with an attention module in every
    inverted residual block.

    Args:
        attention (str | dict | None): 'prm', 'se', 'gc' or a config dict,
            as for :class:`AttentionResNet`; None for the plain MnasNet. For
            PRM without ``groups``, each block takes
            :func:`~prm_det.models.backbones.attention_mobilenet_v2.prm_heads`
            of its width (4 channels a head, at most 64).
        **kwargs: Every argument of :class:`MnasNet` (widen_factor,
            out_indices, frozen_stages, norm_cfg, norm_eval, with_cp,
            init_cfg). An ``init_cfg`` of type ``'Pretrained'`` is checked
            (:mod:`prm_det.models.backbones.pretrained`); ImageNet MnasNet
            weights leave the attention's tensors to
            ``allow_partial='attention'``.
    """


@register_model
class PRMMnasNet(AttentionMnasNet):
    """MnasNet with PRM in every inverted residual block."""
    default_attention = 'prm'
