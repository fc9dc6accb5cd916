# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with BAM after stages 1-3 and no attention inside the blocks.
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='BAMResNet', attention=None))
