"""How the ``triton`` backend launches its kernels: grids, tiles, warps and
the split of each (sample, group)'s positions over several programs.

A pure function of the map's shape, its dtype, the op's groups and the
GPU's SM count (no torch, no triton): on CPU tensors (Triton's interpreter)
the backend passes :data:`SMS_ON_CPU`, an H100/H200's count, so a test or
``benchmarks/kernel_report.py`` at real sizes sees the launches an
H100/H200 gets without running them.

Why split: one program per (sample, group) gives a detection batch (2
images x 64 heads) 128 programs at every stage, fewer than an H100/H200 has
SMs, and a memory-bound kernel reaches the HBM bandwidth only with many
loads in flight per SM. The plan launches at least enough programs for
:data:`TARGET_WARPS_PER_SM` warps per SM where the map has that many tiles
of work; the kernels' tiles are sized so that registers let that many be
resident at once (``tests/test_benchmarks/test_kernel_report.py`` compiles
every launch for sm_80 and sm_90a and checks it).
"""
from typing import NamedTuple, Tuple

SMS_ON_CPU = 132  # an H100 SXM / H200
TARGET_WARPS_PER_SM = 16
# elements of one program's tile, and its warps, per kernel family: sized by
# the registers ptxas gives them (benchmarks/results/kernel_report_*.md)
PRM_TILES = {'forward': (2048, 8), 'backward': (512, 4)}
CHANNEL_TILE = (1024, 4)  # BatchNorm's statistics and backward


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(kind_tile: Tuple[int, int], itemsize: int) -> Tuple[int, int]:
    """A tile in elements and its warps for maps accumulated at
    ``itemsize`` bytes. The tiles are sized for float32 accumulation (half
    precision and float32 maps); float64 maps (tests, references) take the
    same tiles, twice the registers: Triton's interpreter runs them the
    faster for it."""
    del itemsize
    return kind_tile


def _target_programs(sms: int, warps: int) -> int:
    return cdiv(TARGET_WARPS_PER_SM * sms, warps)


class PRMLaunch(NamedTuple):
    """The PRM kernels' launch: ``grid`` = (pair blocks, splits); a program
    takes ``g_block`` (sample, group) pairs and ``chunk`` of their positions
    (a multiple of ``block_p``) in [g_block, block_c, block_p] tiles."""
    grid: Tuple[int, int]
    g_block: int
    block_c: int
    block_p: int
    chunk: int
    splits: int
    num_warps: int


def prm_launch(shape: Tuple[int, int, int, int], groups: int, kind: str,
               acc_itemsize: int, sms: int) -> PRMLaunch:
    """The launch of the PRM kernels of ``kind`` ('forward' or 'backward')
    for a [b, C, h, w] map with ``groups`` heads."""
    b, ch, h, w = shape
    n, cg, positions = b * groups, ch // groups, h * w
    tile, warps = _tile(PRM_TILES[kind], acc_itemsize)
    block_c = next_power_of_2(cg)
    block_p = max(16, min(next_power_of_2(positions),
                          max(1, tile // block_c)))
    g_block = max(1, tile // (block_c * block_p))
    tiles = cdiv(positions, block_p)
    # as many programs as the GPU wants, but none with less than a tile's
    # work: a small map is done in a few programs either way (and Triton's
    # interpreter, which runs programs one by one, takes it the faster)
    target = min(_target_programs(sms, warps),
                 max(1, n * tiles // max(1, g_block)))
    # several pairs a program only while that leaves enough programs
    while g_block > 1 and cdiv(n, g_block) < target:
        g_block //= 2
    g_block = min(g_block, next_power_of_2(max(n, 1)))
    pair_blocks = cdiv(n, g_block)
    wanted = max(1, min(tiles, cdiv(target, max(pair_blocks, 1))))
    chunk = cdiv(tiles, wanted) * block_p
    splits = max(1, cdiv(positions, chunk))
    return PRMLaunch((pair_blocks, splits), g_block, block_c, block_p, chunk,
                     splits, warps)


class ChannelLaunch(NamedTuple):
    """BatchNorm's batch statistics, first level: ``grid`` = (channel
    blocks, splits), split j = (samples block j // psplits, positions chunk
    j % psplits); the PRM forward kernels merge the splits."""
    grid: Tuple[int, int]
    block_ch: int
    block_p: int
    chunk: int
    psplits: int
    samples: int
    splits: int
    num_warps: int


def _channel_tile(positions: int,
                  acc_itemsize: int) -> Tuple[int, int, int]:
    """The per-channel kernels' [block_ch, block_p] tile and warps: one
    channel a program on large maps, several on small ones."""
    tile, warps = _tile(CHANNEL_TILE, acc_itemsize)
    block_p = max(16, min(next_power_of_2(positions), tile))
    return max(1, tile // block_p), block_p, warps


def channel_launch(shape: Tuple[int, int, int, int], acc_itemsize: int,
                   sms: int) -> ChannelLaunch:
    b, ch, h, w = shape
    positions = h * w
    block_ch, block_p, warps = _channel_tile(positions, acc_itemsize)
    channel_blocks = cdiv(ch, block_ch)
    tiles = cdiv(positions, block_p)
    # splits per channel block: enough programs, none under a tile's work
    target = min(_target_programs(sms, warps), channel_blocks * tiles * b)
    wanted = max(1, cdiv(target, channel_blocks))
    chunk = cdiv(tiles, max(1, min(tiles, wanted))) * block_p
    psplits = max(1, cdiv(positions, chunk))
    sample_splits = max(1, min(b, cdiv(wanted, psplits)))
    samples = max(1, cdiv(b, sample_splits))
    splits = psplits * max(1, cdiv(b, samples))
    return ChannelLaunch((channel_blocks, splits), block_ch, block_p, chunk,
                         psplits, samples, splits, warps)


class TileLaunch(NamedTuple):
    """BatchNorm's backward: one [block_ch, block_p] tile a program."""
    grid: Tuple[int, int]
    block_ch: int
    block_p: int
    num_warps: int


def bn_backward_launch(shape: Tuple[int, int, int, int],
                       acc_itemsize: int) -> TileLaunch:
    b, ch, h, w = shape
    positions = h * w
    block_ch, block_p, warps = _channel_tile(positions, acc_itemsize)
    return TileLaunch((b * cdiv(ch, block_ch), cdiv(positions, block_p)),
                      block_ch, block_p, warps)
