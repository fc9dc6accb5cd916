# Data and schedule shared by the demo configs: the generated shapes dataset
# (python tools/make_shapes.py, or `make demo`) at a size and schedule that a
# 2-core CPU trains in minutes. Everything sits under one key so that it does
# not collide with the detector configs these demos inherit; the demo configs
# pick the parts with {{_base_.shapes.*}}.
shapes_data_root = 'data/prm_demo/'  # the demo configs repeat it as data_root
shapes_classes = ('rectangle', 'ellipse', 'triangle', 'cross')
shapes_image_size = 128
shapes_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(shapes_image_size, shapes_image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
shapes_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(shapes_image_size, shapes_image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
shapes_dataset = dict(
    type='CocoDataset',
    data_root=shapes_data_root,
    metainfo=dict(classes=shapes_classes))
shapes = dict(
    train_dataloader=dict(
        batch_size=8,
        num_workers=1,
        persistent_workers=True,
        dataset=dict(
            shapes_dataset,
            ann_file='annotations/instances_train.json',
            data_prefix=dict(img='train/'),
            filter_cfg=dict(filter_empty_gt=True, min_size=4),
            pipeline=shapes_train_pipeline)),
    val_dataloader=dict(
        batch_size=8,
        num_workers=1,
        persistent_workers=True,
        dataset=dict(
            shapes_dataset,
            ann_file='annotations/instances_val.json',
            data_prefix=dict(img='val/'),
            test_mode=True,
            pipeline=shapes_test_pipeline)),
    val_evaluator=dict(
        type='CocoMetric',
        ann_file=shapes_data_root + 'annotations/instances_val.json',
        metric='bbox',
        format_only=False),
    # 2000 images x 4 epochs = 1000 iterations of 8: warmup, then a cosine
    # decay to ~0 so that training ends converged rather than mid-descent
    # (step decay at 1500 iterations left box AP anywhere from 14 to 60
    # over seeds and machines; benchmarks/results/demo_recipe_cpu_2core.md)
    train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=4, val_interval=4),
    param_scheduler=[
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
             end=100),
        dict(type='CosineAnnealingLR', T_max=4, by_epoch=True, begin=0,
             end=4, convert_to_iter_based=True, eta_min=1e-5),
    ],
    default_hooks=dict(
        logger=dict(type='LoggerHook', interval=10),
        checkpoint=dict(type='AtomicCheckpointHook', interval=1,
                        max_keep_ckpts=2)),
    # The ImageNet weights of mmdet's configs cannot be fetched everywhere:
    # the demo backbone trains from scratch, so its norms train too.
    # ResNet-18 at half width (PRM with 16 heads: 2 to 16 channels each) so
    # that a CPU runs the many iterations a detector trained from scratch
    # needs
    backbone=dict(depth=18, base_channels=32, attention=dict(groups=16),
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck_in_channels=[32, 64, 128, 256],
    # narrower FPN and heads: the 256-wide heads cost more than the backbone
    # at this scale on a CPU
    width=64,
    # GroupNorm in the head's towers, as detectors trained from scratch use
    # (RetinaNet's head has no norm): the loss falls twice as fast
    head_norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
    # from scratch in a thousand iterations AdamW converges where SGD at the
    # 1x schedule's rate needs far more iterations than a demo has
    optim_wrapper=dict(
        optimizer=dict(_delete_=True, type='AdamW', lr=2e-3,
                       weight_decay=0.05),
        clip_grad=dict(max_norm=35, norm_type=2)),
    num_classes=len(shapes_classes),
)
