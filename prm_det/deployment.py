"""ONNX export of a detector's backbone and neck, checked with onnxruntime.

While a model is exported (``torch.onnx.export``, either exporter, or any
``torch.export``/``torch.jit`` trace) PRM takes its readable reference
(:func:`prm_det.ops.prm_reference`: argmax, gather, matmul and elementwise
ops; no custom op, no autograd Function, no ``nonzero``, no host sync),
chosen where the backend is chosen (:func:`prm_det.ops.select_backend`).
SE and GC are standard ops already. The graph keeps the image's height and
width dynamic: sizes the trace sees stay functions of the input's size.

- TorchScript-based exporter (``dynamo=False``): opset 17 by default.
- dynamo-based exporter (``dynamo=True``, needs ``onnxscript``): opset 18 by
  default, the lowest that torch 2.13's implementation of it writes (asked
  for 17 it writes 18 anyway, after a failed down-conversion). Its weights
  go into the ``.onnx`` file too (torch's default for it is a separate
  ``.onnx.data`` file, which a copy of the ``.onnx`` alone would lose).

Both need ``onnx`` and the check ``onnxruntime`` (``pip install
'prm_det[onnx]'`` installs the three): :func:`missing_export_modules` names
the ones missing before any tracing.

Heads are not exported here: their post-processing (anchors, NMS, RoIAlign)
runs on mmcv's ops; MMDeploy exports whole detectors with its own ONNX
Runtime / TensorRT ops for them. Used by ``tools/deployment/export_onnx.py``.
"""
import importlib.util
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

INPUT_NAME = 'image'
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18


def missing_export_modules(dynamo: bool = False) -> List[str]:
    """The modules an export and its check need that are not installed:
    onnx, onnxruntime, and onnxscript for the dynamo-based exporter."""
    needed = ['onnx', 'onnxruntime'] + (['onnxscript'] if dynamo else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


class BackboneNeck(nn.Module):
    """A detector's ``backbone`` followed by its ``neck`` (if any): the
    multi-level features its heads read, as a tuple.

    Args:
        backbone (nn.Module): returns a tuple of feature maps.
        neck (nn.Module, optional): takes and returns them (FPN, ...).
    """

    def __init__(self, backbone: nn.Module,
                 neck: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        features = self.backbone(image)
        if self.neck is not None:
            features = self.neck(features)
        return tuple(features)


def output_names(count: int) -> List[str]:
    return [f'feature{i}' for i in range(count)]


def export_onnx(model: nn.Module, image: Tensor, path: str,
                dynamo: bool = False, opset: Optional[int] = None) -> int:
    """Export ``model`` (in eval mode) at ``image``'s size to ``path`` with
    the image's height and width dynamic (the batch size is the
    example's); returns the opset written.

    Args:
        model (nn.Module): takes one [b, 3, h, w] image, returns a tensor or
            a tuple of tensors.
        image (Tensor): the example input.
        path (str): the .onnx file to write.
        dynamo (bool): the dynamo-based exporter (``torch.export``) instead
            of the TorchScript-based one. Defaults to False.
        opset (int, optional): defaults to 17 (TorchScript) or 18 (dynamo).
    """
    model.eval()
    with torch.no_grad():
        outputs = model(image)
    names = output_names(len(outputs) if isinstance(outputs, (tuple, list))
                         else 1)
    axes = {INPUT_NAME: {2: 'height', 3: 'width'}}
    if dynamo:
        # the exporter names each output size after the input's
        # ("((height - 1)//4) + 1", ...)
        opset = opset or DYNAMO_OPSET
    else:
        opset = opset or TORCHSCRIPT_OPSET
        axes.update({name: {2: f'{name}_height', 3: f'{name}_width'}
                     for name in names})
    with warnings.catch_warnings():
        # the dynamo exporter turns dynamic_axes into torch.export's
        # dynamic shapes (and names the ONNX dims after them); it warns that
        # dynamic_shapes is the recommended argument
        warnings.filterwarnings('ignore', message=".*'dynamic_axes' is not "
                                'recommended when dynamo=True')
        # dynamo: the weights inside the .onnx (a backbone + neck is far
        # under ONNX's 2 GB limit), not in a .onnx.data file beside it
        extra = dict(external_data=False) if dynamo else {}
        torch.onnx.export(model, (image, ), path, dynamo=dynamo,
                          opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=axes, **extra)
    return written_opset(path)


def written_opset(path: str) -> int:
    """The default-domain opset of an ONNX file (the dynamo exporter may
    write another than the one asked for)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import
                if o.domain in ('', 'ai.onnx'))


def onnxruntime_session(path: str):
    """An onnxruntime session on the CPU for the exported file."""
    import onnxruntime
    return onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])


def onnxruntime_outputs(session, image: Tensor) -> list:
    """The exported model's outputs on ``image`` (session: a path or an
    :func:`onnxruntime_session`)."""
    if isinstance(session, str):
        session = onnxruntime_session(session)
    return session.run(None, {INPUT_NAME: image.numpy()})


def relative_errors(actual: Sequence, expected: Sequence[Tensor]
                    ) -> List[float]:
    """Per output: max |actual - expected| / max |expected|."""
    if len(actual) != len(expected):
        raise ValueError(f'{len(actual)} outputs, expected {len(expected)}')
    errors = []
    for got, want in zip(actual, expected):
        want = want.detach().double()
        got = torch.as_tensor(got).double()
        if got.shape != want.shape:
            raise ValueError(f'output of shape {tuple(got.shape)}, expected '
                             f'{tuple(want.shape)}')
        scale = want.abs().max().clamp_min(1e-30)
        errors.append(((got - want).abs().max() / scale).item())
    return errors


def check_onnx(model: nn.Module, path: str,
               images: Sequence[Tensor]) -> List[List[float]]:
    """For each image, the relative error of onnxruntime's outputs against
    ``model``'s, per output."""
    session = onnxruntime_session(path)
    errors = []
    for image in images:
        with torch.no_grad():
            expected = model(image)
        if isinstance(expected, Tensor):
            expected = (expected, )
        errors.append(relative_errors(onnxruntime_outputs(session, image),
                                      expected))
    return errors
