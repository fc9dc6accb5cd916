# CBAM (r=16)-ResNet-50 on ImageNet-1k: MMPretrain's ResNet-50 recipe with only
# the backbone changed (docs/pretrain.md). The PRM paper's Table 1 row:
# 28.090M, 4.139 GFLOPs (attention-module's ResNet + CBAM).
_base_ = './resnet50_8xb32_in1k.py'
model = dict(backbone=dict(type='mmdet.CBAMResNet'))
