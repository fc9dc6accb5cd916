# ResNet-101 on ImageNet-1k, MMPretrain's recipe as it is: the baseline of the
# attention ResNet-101s PytorchInsight publishes (SE, SK, BAM, CBAM, SGE).
# The backbone is prm_det's AttentionResNet without attention (mmdet's ResNet).
_base_ = 'mmpretrain::resnet/resnet101_8xb32_in1k.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(backbone=dict(type='mmdet.AttentionResNet'))
