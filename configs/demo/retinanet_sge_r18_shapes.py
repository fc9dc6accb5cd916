# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with SGE in every block: 16 groups of 2 channels in the 32-channel first
# stage (ResNet-50's 64 groups do not divide the half-width stages).
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='SGEResNet', attention=dict(type='SGE',
                                                            groups=16)))
