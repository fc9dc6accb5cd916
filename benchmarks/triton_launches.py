"""Recording the ``triton`` backend's kernel launches instead of running
them: benchmark instrumentation, kept out of the backend.

:func:`record_launches` replaces the backend's one launch function
(``prm_det.ops.backends.triton_backend._launch``) inside its block, so each
launch the backend makes is kept as a :class:`Launch` (the kernel, its grid,
warps and arguments by name) and the outputs and state stay unwritten.
``kernel_report.py`` compiles the recorded launches for a GPU target;
``kernel_bandwidth.py`` runs and times them one by one.
"""
import contextlib
from typing import Iterator, List, NamedTuple, Tuple

from prm_det.ops.backends import triton_backend


class Launch(NamedTuple):
    """One kernel launch as the backend makes it: the kernel, its name, its
    grid and warps, and its arguments by name (tensors, ints, floats and
    the constexprs)."""
    kernel: object
    name: str
    grid: Tuple[int, ...]
    num_warps: int
    args: dict


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Inside the block the ``triton`` backend records its launches instead
    of running them.

    Example:
        >>> with record_launches() as launches:  # doctest: +SKIP
        ...     triton_backend.forward(c, None, None, False, params, options)
    """
    launches: List[Launch] = []

    def record(kernel, grid, num_warps, **args) -> None:
        launches.append(Launch(kernel, kernel.fn.__name__, tuple(grid),
                               num_warps, args))

    original = triton_backend._launch
    triton_backend._launch = record
    try:
        yield launches
    finally:
        triton_backend._launch = original


def run(launch: Launch) -> None:
    """Launch a recorded launch (on the device its tensors are on)."""
    launch.kernel[launch.grid](**launch.args, num_warps=launch.num_warps)
