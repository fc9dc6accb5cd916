# configs/cascade_rcnn_prm_r50.py shrunk for a 2-core CPU on the generated
# shapes dataset (PRM-ResNet-18 from scratch, 128 px images).
_base_ = ['../../cascade_rcnn_prm_r50.py', '../_shapes_data.py']
data_root = 'data/prm_demo/'  # what --cfg-options data_root=... moves
num_classes = {{_base_.shapes.num_classes}}
model = dict(
    backbone={{_base_.shapes.backbone}},
    neck=dict(in_channels={{_base_.shapes.neck_in_channels}}),
    # mmdet's three cascade stages, only num_classes changed (lists do not
    # merge with the base, so they are written out).
    roi_head=dict(bbox_head=[
        dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=num_classes,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0., 0., 0., 0.],
                target_stds=stds),
            reg_class_agnostic=True,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
        for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                     [0.033, 0.033, 0.067, 0.067])
    ]))
train_dataloader = {{_base_.shapes.train_dataloader}}
val_dataloader = {{_base_.shapes.val_dataloader}}
test_dataloader = val_dataloader
val_evaluator = {{_base_.shapes.val_evaluator}}
test_evaluator = val_evaluator
train_cfg = {{_base_.shapes.train_cfg}}
param_scheduler = {{_base_.shapes.param_scheduler}}
default_hooks = {{_base_.shapes.default_hooks}}
optim_wrapper = {{_base_.shapes.optim_wrapper}}
auto_scale_lr = dict(base_batch_size=8)
randomness = dict(seed=0)  # the demo's numbers are reproducible
