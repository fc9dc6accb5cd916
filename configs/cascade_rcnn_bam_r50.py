# Cascade R-CNN R50-FPN 1x with BAM (r=16, dilation 4) after stages 1-3:
# ./cascade_rcnn_r50.py with only the backbone type changed. The attention
# starts from its initialization, the rest from ImageNet ResNet weights
# (prm_det.models.backbones.pretrained);
# tools/model_converters/attention2prm_det.py converts published weights.
_base_ = './cascade_rcnn_r50.py'
model = dict(backbone=dict(type='BAMResNet',
                           init_cfg=dict(allow_partial='attention')))
