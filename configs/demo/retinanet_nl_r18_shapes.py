# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with one non-local block (mmcv's NonLocal2d) before stage c4's last block.
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='NLResNet', attention=None))
