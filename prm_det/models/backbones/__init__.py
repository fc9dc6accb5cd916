from .attention_resnet import (AttentionResNet, GCResNet, PluginBasicBlock,
                               PRMResNet, SEResNet)

__all__ = [
    'AttentionResNet', 'PRMResNet', 'SEResNet', 'GCResNet', 'PluginBasicBlock'
]
