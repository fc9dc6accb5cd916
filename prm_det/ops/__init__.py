"""PRM's tensor ops (torch only: nothing here imports mmcv or mmdet).

- :func:`prm`, :func:`prm_block_tail`: the op, on the backend chosen by
  :func:`select_backend` (``cpu`` kernel, ``triton`` kernels, ``torch``
  ops); :func:`use_backend` or ``PRM_DET_BACKEND`` force one. It runs as
  the custom op ``torch.ops.prm_det.block_tail`` (:mod:`.library`), which
  ``torch.compile`` and CUDA graphs see whole (exporting takes the
  reference).
- :func:`prm_reference`: the readable version, the oracle of the tests.
- :class:`PRMOptions`, :class:`PRMParams`, :class:`BatchNorm`,
  :class:`PRMState`: what the op and the backends pass each other.
"""
from .backends import ENV_VAR, NAMES as BACKEND_NAMES
from .backends import select as select_backend
from .backends import use_backend
from .contract import BatchNorm, PRMOptions, PRMParams, PRMState
from .functions import prm, prm_block_tail
from .reference import (MODES, NORM_EPS, PRMIntermediates, prm_reference,
                        prm_reference_of, prm_reference_with_intermediates)

__all__ = [
    'BACKEND_NAMES', 'ENV_VAR', 'BatchNorm', 'MODES', 'NORM_EPS',
    'PRMOptions', 'PRMParams', 'PRMState', 'prm',
    'prm_block_tail', 'prm_reference', 'prm_reference_of',
    'prm_reference_with_intermediates', 'PRMIntermediates', 'select_backend',
    'use_backend'
]
