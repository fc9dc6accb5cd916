# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with mmdet's plain ResNet-18 at the same width: the baseline of
# tools/analysis_tools/compare_backbones.py.
_base_ = './retinanet_prm_r18_shapes.py'
# the demo's backbone settings as they are, less PRM's `attention`, which
# mmdet's ResNet does not take (_delete_: the base's key would merge back)
model = dict(backbone=dict(
    {k: v for k, v in _base_.model.backbone.items() if k != 'attention'},
    _delete_=True, type='ResNet'))
