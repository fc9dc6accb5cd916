# BAM-ResNet-101 on ImageNet-1k: MMPretrain's ResNet-101 recipe with only the
# backbone changed, the depth PytorchInsight also publishes (docs/pretrain.md).
_base_ = './resnet101_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.BAMResNet'))
