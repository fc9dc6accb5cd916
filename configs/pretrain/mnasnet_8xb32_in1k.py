# MnasNet (B1, depth multiplier 1.0: torchvision's mnasnet1_0) on ImageNet-1k,
# on prm_det's AttentionMnasNet without attention (prm_det's MnasNet, checked
# init_cfg): the baseline of prm_mnasnet_8xb32_in1k.py. MMPretrain has no
# MnasNet recipe: this is its MobileNetV2 recipe (300 epochs) with the
# backbone replaced (out_indices=(7, ): the 1280-wide last conv) and the
# head's in_channels set to that width, 1280. The PRM paper: top-1 71.72,
# 0.330 GFLOPs, 4.38M parameters.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='mmdet.AttentionMnasNet',
                  out_indices=(7, )),
    head=dict(in_channels=1280))
