# PRM-ResNet-50 on ImageNet-1k: MMPretrain's ResNet-50 recipe with only the
# backbone changed (docs/pretrain.md). The PRM paper's Table 1 trained its
# ResNets with the same standard schedule; the official PRM code's training
# script is not published with the paper, so no setting of it is assumed here.
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.PRMResNet'))
