# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with CBAM in every block (r=16: 2 hidden channels in the first stage).
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='CBAMResNet', attention='cbam'))
