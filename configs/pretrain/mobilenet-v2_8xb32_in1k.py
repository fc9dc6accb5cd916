# MobileNetV2 on ImageNet-1k, MMPretrain's recipe, on prm_det's
# AttentionMobileNetV2 without attention (mmdet's MobileNetV2, checked
# init_cfg): the baseline of prm_mobilenet-v2_8xb32_in1k.py.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(backbone=dict(type='mmdet.AttentionMobileNetV2', out_indices=(7, )))
