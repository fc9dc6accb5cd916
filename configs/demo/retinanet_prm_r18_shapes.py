# The `make demo` job: configs/retinanet_prm_r50.py shrunk for a 2-core CPU
# on the generated shapes dataset: a half-width PRM-ResNet-18 from scratch,
# a narrower FPN and GroupNorm head, small images and a short AdamW
# schedule (the numbers are in ./_shapes_data.py, under `shapes`).
_base_ = ['../retinanet_prm_r50.py', './_shapes_data.py']
data_root = 'data/prm_demo/'  # what --cfg-options data_root=... moves
model = dict(
    backbone={{_base_.shapes.backbone}},
    neck=dict(in_channels={{_base_.shapes.neck_in_channels}},
              out_channels={{_base_.shapes.width}}),
    bbox_head=dict(num_classes={{_base_.shapes.num_classes}},
                   in_channels={{_base_.shapes.width}},
                   feat_channels={{_base_.shapes.width}},
                   norm_cfg={{_base_.shapes.head_norm_cfg}}))
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
