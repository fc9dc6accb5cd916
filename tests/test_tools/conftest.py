import pytest

from prm_det.datasets.synthetic_shapes import generate


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """8 train and 4 val images of 96 px, written once for the session."""
    root = str(tmp_path_factory.mktemp('shapes'))
    generate(root, num_train=8, num_val=4, image_size=96, max_objects=3,
             min_size=16, max_size=48, seed=1)
    return root
