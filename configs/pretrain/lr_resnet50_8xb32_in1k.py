# LR-ResNet-50 (LR-Net-50 of Hu et al., ICCV 2019: every 3x3 conv and the
# stem a 7x7 local relation layer) on ImageNet-1k: MMPretrain's ResNet-50
# recipe with only the backbone changed (docs/pretrain.md). Its checkpoint
# starts ../retinanet_lr_r50.py and ../cascade_rcnn_lr_r50.py. The paper:
# 23.3M, 4.3 GFLOPs; ours 23.38M, 4.15 GFLOPs (docs/models.md).
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.LRResNet', depth=50))
