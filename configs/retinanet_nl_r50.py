# RetinaNet R50-FPN 1x with one mmcv NonLocal2d before stage c4's last block
# (the non-local paper's detection placement): ./retinanet_r50.py with only the
# backbone type changed. The attention starts from its initialization, the rest
# from ImageNet ResNet weights (prm_det.models.backbones.pretrained);
# tools/model_converters/attention2prm_det.py converts published weights.
_base_ = './retinanet_r50.py'
model = dict(backbone=dict(type='NLResNet',
                           init_cfg=dict(allow_partial='attention')))
