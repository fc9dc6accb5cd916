# ResNet-50 on ImageNet-1k, MMPretrain's recipe as it is (100 epochs, SGD lr 0.1
# for 256 images, steps at 30/60/90): the baseline the attention ResNets are
# compared with. The backbone is prm_det's AttentionResNet without attention,
# i.e. mmdet's ResNet (same tensors as MMPretrain's), so its checkpoint starts
# the detectors of configs/ with every tensor checked (docs/pretrain.md).
#   mim train mmpretrain configs/pretrain/resnet50_8xb32_in1k.py
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
# backbone types carry 'mmdet.': prm_det's classes are in mmdet's registry,
# and under MMPretrain's scope a bare name could find MMPretrain's own
# (MMPretrain has an SEResNet of its own)
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(backbone=dict(type='mmdet.AttentionResNet'))
