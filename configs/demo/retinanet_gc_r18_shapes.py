# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with GCNet's global context block instead of PRM (GCResNet's default:
# r=16, attention pooling, channel_add, stages c3-c5).
_base_ = './retinanet_prm_r18_shapes.py'
# the name replaces the demo's PRM options (groups=16) as a whole
model = dict(backbone=dict(type='GCResNet', attention='gc'))
