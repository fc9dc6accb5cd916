# GC (r=16)-ResNet-50 on ImageNet-1k: MMPretrain's ResNet-50 recipe with only
# the backbone changed (docs/pretrain.md). GC in every stage, as in the PRM
# paper's ImageNet table (28.105M); the detection configs keep GCNet's c3-c5.
# The official PRM code's training script is not published with the paper,
# so no setting of it is assumed here.
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.GCResNet',
                           attention_stages=(True, True, True, True)))
