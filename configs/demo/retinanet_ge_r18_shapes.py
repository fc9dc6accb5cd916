# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with GE-theta-minus (parameter-free gather-excite) in every block.
_base_ = './retinanet_prm_r18_shapes.py'
# the name replaces the demo's PRM options (groups=16) as a whole
model = dict(backbone=dict(type='GEResNet', attention='ge'))
