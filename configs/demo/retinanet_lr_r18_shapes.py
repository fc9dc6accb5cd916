# The PRM demo (./retinanet_prm_r18_shapes.py: recipe, data and schedule)
# with LR-Net's local relation layers in place of the ResNet-18's 3x3 convs
# and its stem (7x7 windows, 8 channels a group; widths 52/104/200/400 between
# each block's two layers): the depth and width of the other demos (the paper
# has no LR-Net-18: prm_det/models/backbones/lr_resnet.py).
_base_ = './retinanet_prm_r18_shapes.py'
model = dict(backbone=dict(type='LRResNet', attention=None))
