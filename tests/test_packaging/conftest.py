import pytest
from packaging_helpers import build_wheel


@pytest.fixture(scope='session')
def wheel(tmp_path_factory):
    """prm_det's wheel, built once for the session."""
    return build_wheel(tmp_path_factory.mktemp('wheel'))
