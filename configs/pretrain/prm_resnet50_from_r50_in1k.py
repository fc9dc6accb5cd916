# The short route (docs/pretrain.md): the PRM-ResNet-50 classifier starts from
# ImageNet ResNet-50 weights (torchvision's, 76.1 top-1) with the attention at
# its initialization, and fine-tunes for 10 epochs (cosine from lr 0.01 for 256
# images) instead of training 100 from scratch: about a tenth of the compute.
_base_ = './prm_resnet50_8xb32_in1k.py'
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained',
                                checkpoint='torchvision://resnet50',
                                allow_partial='attention')))
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', by_epoch=True,
                       T_max=10, eta_min=0)
train_cfg = dict(max_epochs=10)
