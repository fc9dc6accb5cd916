# LR-ResNet-26 (LR-Net-26 of Hu et al., ICCV 2019: [2, 2, 2, 2] Bottlenecks,
# every 3x3 conv and the stem a 7x7 local relation layer) on ImageNet-1k:
# MMPretrain's ResNet-50 recipe with only the backbone changed (the paper's
# recipe is not published with code; docs/pretrain.md). The paper: 14.7M,
# 2.6 GFLOPs, 75.7 top-1; ours 14.61M, 2.46 GFLOPs (docs/models.md).
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.LRResNet', depth=26))
