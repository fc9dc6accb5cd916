"""The installed stack: imports, mmcv's compiled ops on CPU, mmdet's RetinaNet."""
import os.path as osp

import pytest
import torch


def pinned(package):
    """The version requirements.txt pins for ``package`` (what `make setup`
    installs; users' own environments may hold any version prm_det's
    pyproject.toml and prm_det.compat accept)."""
    path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                    'requirements.txt')
    for line in open(path):
        name, _, version = line.strip().partition('==')
        if name == package:
            return version
    raise AssertionError(f'requirements.txt pins no {package}')


def test_make_setup_installed_the_pinned_stack():
    import mmcv
    import mmdet
    import mmengine
    import pycocotools  # noqa: F401

    import prm_det
    assert torch.__version__.split('+')[0] == pinned('torch')
    assert mmengine.__version__ == pinned('mmengine')
    assert mmcv.__version__ == pinned('mmcv')
    assert mmdet.__version__ == pinned('mmdet')
    assert prm_det.__version__


def test_torchvision_pairs_with_torch_so_mmpretrain_and_mmdet_import():
    """MMPretrain imports torchvision, and mmdet 3.3 imports MMPretrain
    when it is installed: a torchvision that does not pair with torch
    ('operator torchvision::nms does not exist') breaks mmdet too."""
    import mmpretrain
    import torchvision
    from mmdet.models.backbones import ResNet  # noqa: F401
    from torchvision.ops import nms
    assert torchvision.__version__.split('+')[0] == pinned('torchvision')
    assert mmpretrain.__version__ == pinned('mmpretrain')
    keep = nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]),
               torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]


def test_nms_keeps_the_right_boxes():
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [50., 50., 60., 60.], [0., 0., 10., 9.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 3 (0.95) suppresses 0 and 1; box 2 is far away
    assert keep.tolist() == [3, 2]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.95, 0.7]))


def test_roi_align_runs_on_cpu():
    from mmcv.ops import RoIAlign
    feats = torch.randn(2, 8, 16, 16, requires_grad=True)
    rois = torch.tensor([[0, 1., 1., 9., 9.], [1, 0., 4., 15., 12.]])
    out = RoIAlign((7, 7), spatial_scale=1.0, sampling_ratio=2)(feats, rois)
    assert out.shape == (2, 8, 7, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def focal_loss_inputs(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    return logits, labels


def test_sigmoid_focal_loss_on_cpu_through_mmdet_focal_loss():
    # mmcv 2.1.0 compiles sigmoid_focal_loss for CUDA only; on CPU mmdet's
    # FocalLoss (what RetinaNet uses) takes its PyTorch path. Both import.
    from mmcv.ops import sigmoid_focal_loss  # noqa: F401
    from mmdet.models.losses import FocalLoss
    logits, labels = focal_loss_inputs('cpu')
    loss = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25)(logits, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert logits.grad.shape == (6, 5) and torch.isfinite(logits.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_mmcv_sigmoid_focal_loss_matches_mmdet_on_gpu():
    from mmcv.ops import sigmoid_focal_loss
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    logits, labels = focal_loss_inputs('cuda')
    ops = sigmoid_focal_loss(logits, labels, 2.0, 0.25, None, 'mean')
    one_hot = torch.nn.functional.one_hot(labels, 6)[:, :5].float()
    ref = py_sigmoid_focal_loss(logits, one_hot, None, 2.0, 0.25, 'mean')
    assert torch.isfinite(ops)
    torch.testing.assert_close(ops * 5, ref * 5, rtol=1e-4, atol=1e-5)


def test_mmdet_retinanet_gives_finite_losses_on_two_images():
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmengine.hub import get_config
    cfg = get_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    packed = demo_mm_inputs(2, [[3, 128, 128], [3, 96, 128]],
                            num_items=[3, 2], num_classes=80)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
    assert torch.isfinite(total) and total > 0
