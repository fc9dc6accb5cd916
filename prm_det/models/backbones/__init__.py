from .attention_mobilenet_v2 import AttentionMobileNetV2, PRMMobileNetV2
from .attention_resnet import (AttentionResNet, GCResNet, PluginBasicBlock,
                               PRMResNet, SEResNet)

__all__ = [
    'AttentionResNet', 'PRMResNet', 'SEResNet', 'GCResNet', 'PluginBasicBlock',
    'AttentionMobileNetV2', 'PRMMobileNetV2'
]
