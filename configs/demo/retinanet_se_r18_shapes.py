# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with SE in every block instead of PRM (SEResNet's default, r=16: 2 hidden
# channels in the 32-channel first stage).
_base_ = './retinanet_prm_r18_shapes.py'
# the name replaces the demo's PRM options (groups=16) as a whole
model = dict(backbone=dict(type='SEResNet', attention='se'))
