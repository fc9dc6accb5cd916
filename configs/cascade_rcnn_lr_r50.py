# Cascade R-CNN R50-FPN 1x with LR-Net's local relation layers (Hu et al.,
# ICCV 2019; prm_det/models/backbones/lr_resnet.py): ./cascade_rcnn_r50.py
# with the backbone type changed. No ImageNet LR-Net weights are published and
# ResNet weights do not fit it (other widths, no 3x3 convs), so it starts from
# the classifier of configs/pretrain/lr_resnet50_8xb32_in1k.py (train it
# first, docs/pretrain.md), every tensor checked.
_base_ = './cascade_rcnn_r50.py'
model = dict(backbone=dict(
    type='LRResNet',
    init_cfg=dict(checkpoint='work_dirs/lr_resnet50_8xb32_in1k/epoch_100.pth')))
