# GE-theta-minus (gather-excite without parameters, global extent)-ResNet-50
# on ImageNet-1k: MMPretrain's ResNet-50 recipe with only the backbone changed
# (docs/pretrain.md). The PRM paper's Table 1 row: 25.557M, 4.127 GFLOPs.
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.GEResNet'))
