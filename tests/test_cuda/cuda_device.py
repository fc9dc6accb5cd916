"""The device this folder's tests run on: CUDA where there is one;
otherwise, with ``PRM_DET_CUDA_TESTS_ON_CPU=1``, CPU tensors through
Triton's interpreter (conftest sets TRITON_INTERPRET=1; a check of the
files themselves, detection sizes left out); else they skip."""
import os

import pytest
import torch

if torch.cuda.is_available():
    DEVICE = 'cuda'
elif os.environ.get('PRM_DET_CUDA_TESTS_ON_CPU') == '1':
    DEVICE = 'cpu'
else:
    DEVICE = None
on_the_device = pytest.mark.skipif(
    DEVICE is None, reason='needs a CUDA GPU (benchmarks/gpu_run.sh)')
needs_cuda = pytest.mark.skipif(DEVICE != 'cuda',
                                reason='detection sizes: CUDA only')
