# PRM-MobileNetV2 on ImageNet-1k: MMPretrain's MobileNetV2 recipe (300 epochs)
# with PRM in every inverted residual block (prm_det's PRMMobileNetV2, mmdet's
# MobileNetV2 plus PRM; out_indices=(7, ): the 1280-wide last conv, as
# MMPretrain's own MobileNetV2 gives its classifier). The PRM paper: top-1
# 71.03 -> 72.55, 0.320 -> 0.321 GFLOPs, 3.51M parameters.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(backbone=dict(type='mmdet.PRMMobileNetV2', out_indices=(7, )))
