from .attention_mnasnet import AttentionMnasNet, PRMMnasNet
from .attention_mobilenet_v2 import AttentionMobileNetV2, PRMMobileNetV2
from .attention_resnet import (AttentionResNet, BAMResNet, CBAMResNet,
                               GCResNet, GEResNet, NLResNet, PluginBasicBlock,
                               PRMResNet, SEResNet, SGEResNet)
from .lr_resnet import LRResNet
from .mnasnet import MnasNet
from .sk_resnet import SKResNet

__all__ = [
    'AttentionResNet', 'PRMResNet', 'SEResNet', 'GCResNet', 'GEResNet',
    'SGEResNet', 'CBAMResNet', 'BAMResNet', 'SKResNet', 'NLResNet',
    'LRResNet',
    'PluginBasicBlock',
    'AttentionMobileNetV2', 'PRMMobileNetV2',
    'MnasNet', 'AttentionMnasNet', 'PRMMnasNet'
]
