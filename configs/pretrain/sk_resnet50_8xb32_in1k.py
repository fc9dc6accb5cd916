# SK-ResNet-50 (PytorchInsight's resnet_sk.py: a grouped 3x3 beside each
# Bottleneck's 3x3, 32 groups, r=16) on ImageNet-1k: MMPretrain's ResNet-50
# recipe with only the backbone changed (docs/pretrain.md). The PRM paper's
# Table 1 row: 26.154M, 4.187 GFLOPs.
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.SKResNet'))
