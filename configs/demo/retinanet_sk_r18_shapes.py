# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with selective-kernel blocks: 16 groups in the grouped branch (2 channels a
# group in the 32-channel first stage, as 32 groups at ResNet's 64).
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='SKResNet', attention=None,
                           sk=dict(groups=16)))
