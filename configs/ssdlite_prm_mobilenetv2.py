# SSDLite on PRM-MobileNetV2: mmdet's SSDLite-MobileNetV2 (trained from
# scratch, 600 epochs; 21.3 box AP in mmdet's model zoo) with PRM in every
# inverted residual block (prm_det's PRMMobileNetV2). To start from an
# ImageNet PRM-MobileNetV2 (configs/pretrain/prm_mobilenet-v2_8xb32_in1k.py):
#   --cfg-options model.backbone.init_cfg._delete_=True \
#       model.backbone.init_cfg.type=Pretrained \
#       model.backbone.init_cfg.checkpoint=work_dirs/.../epoch_300.pth
# (_delete_: replaces the TruncNormal init instead of merging into it)
_base_ = 'mmdet::ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'
custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                      allow_failed_imports=False)
model = dict(backbone=dict(type='PRMMobileNetV2'))
# checkpoints that a kill cannot break (prm_det.engine.checkpoints.writing); a rank that
# stalls fails the job after 5 minutes (gloo's default wait is 30)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
env_cfg = dict(dist_cfg=dict(timeout=300))
