_base_ = 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
# the attention starts from its initialization, the rest from ImageNet ResNet
# weights; any other tensor the checkpoint leaves out stops training
# (prm_det.models.backbones.pretrained)
model = dict(backbone=dict(type='SEResNet',
                           init_cfg=dict(allow_partial='attention')))
# checkpoints that a kill cannot break (prm_det.engine.checkpoints.writing); a rank that
# stalls fails the job after 5 minutes (gloo's default wait is 30)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
env_cfg = dict(dist_cfg=dict(timeout=300))
