# SE (r=16)-ResNet-50 on ImageNet-1k: MMPretrain's ResNet-50 recipe with only the
# backbone changed (docs/pretrain.md). The PRM paper's Table 1 trained its
# ResNets with the same standard schedule; the official PRM code's training
# script is not published with the paper, so no setting of it is assumed here.
_base_ = './resnet50_8xb32_in1k.py'
# 'mmdet.': prm_det's SE-ResNet (MMPretrain's own SEResNet would take the bare
# name under MMPretrain's scope)
model = dict(backbone=dict(type='mmdet.SEResNet'))
