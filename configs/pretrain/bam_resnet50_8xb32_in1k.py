# BAM (r=16, dilation 4, after stages 1-3)-ResNet-50 on ImageNet-1k:
# MMPretrain's ResNet-50 recipe with only the backbone changed
# (docs/pretrain.md). PytorchInsight's table: 25.92M, 4.205 GFLOPs. The
# branches multiply, as the official code and its published weights.
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.BAMResNet'))
