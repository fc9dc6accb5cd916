"""PRM's Triton kernels (dot-product mode), launched by :mod:`.triton_backend`.

Every kernel runs on a 2-D grid: axis 0 takes ``G_BLOCK`` (sample, group)
pairs (one where the maps are large; several for small maps, so that a
program has a tile's worth of work), axis 1 a split of their positions, a
contiguous chunk of ``chunk`` positions (a multiple of ``BLOCK_P``), so a
detection batch's 2 x 64 pairs still give every SM several programs. A
program sweeps its chunk in [G_BLOCK, BLOCK_C, BLOCK_P] tiles (every
channel of a position in one tile), so S, the gate and every per-position
gradient are made in registers and never stored:

    forward   fwd_sums    channel sums, first argmax of the channel sum
              fwd_stats   S over the chunk -> its mean and M2 (Chan)
              fwd_out     y = x * gate (+ identity, ReLU), written
    backward  bwd_sums    dL/dgate, dL/dS's pieces: every sum backward needs,
                          split by linearity so one sweep gives them all
              bwd_out     dL/dx (or BatchNorm's dL/dc) written

Every per-(sample, group) reduction is exact and two-level: a program writes
its chunk's partial result into a small scratch ([pairs, splits, ...]) and
the next kernel's programs each combine the partials of their pairs in
split order (the same loop in every program, so every program gets the same
bits): no atomics, the same input gives the same outputs run after run.

With BatchNorm folded in, the passes read the convolution's output and
apply the per-channel affine as they load (the normalized map is never
written); its batch statistics are two-level in the same way: partials
from :func:`channel_partial_kernel`, merged by every forward program for
its own channels (no launch of a few programs for C values). Maps are read in
their own dtype (float16, bfloat16, float32, float64) and accumulated in
``ACC`` (float32, or float64 for float64 maps). Positions are addressed as
``p * stride_p``, which holds for contiguous and channels_last maps alike.
"""
import triton
import triton.language as tl

_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TINY_VAR = tl.constexpr(1e-30)  # as prm_det.ops.reference._TINY_VAR
_TINY_STD = tl.constexpr(1e-15)
_NEG_INF = tl.constexpr(float('-inf'))
# backward's per-(sample, group) sums: (r, r * centred), then (r f, f,
# centred f) for f in alpha, beta, theta_row, theta_col, sigma
_PAIR_SUMS = tl.constexpr(17)
_PAIR_STRIDE = tl.constexpr(32)  # their row in the scratch, padded
# backward's per-channel sums: (r f, f, centred f) for f = D x (query) and
# f = x (context)
_CHANNEL_SUMS = tl.constexpr(6)


@triton.jit
def _load_tile(ptr, base, chans, stride_c, offs, stride_p, mask, a, shift,
               HAS_NORM: tl.constexpr, ACC: tl.constexpr):
    """[G, C, P] values of a map in ACC (base [G], chans [G, C], offs [P]);
    BatchNorm's affine (a, shift [G, C]) applied when folded in."""
    ptrs = (ptr + base[:, None, None] + chans[:, :, None] * stride_c +
            offs[None, None, :] * stride_p)
    x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    if HAS_NORM:
        x = tl.where(mask, x * a[:, :, None] + shift[:, :, None], 0.0)
    return x


@triton.jit
def _gauss(t, sigma):
    return tl.exp(-0.5 * (t / sigma) * (t / sigma)) * (_INV_SQRT_2PI / sigma)


@triton.jit
def _position(offs, qi, W, theta_row, theta_col, sigma, inv_hm1, inv_wm1,
              NORMALIZED: tl.constexpr, ACC: tl.constexpr):
    """D = (G(theta_row d_row) + G(theta_col d_col)) / 2 for positions offs
    [P] and query positions qi [G], [G, P], with the distances and the two
    Gaussians (for the gradients of theta and sigma)."""
    q_row = qi // W
    q_col = qi - q_row * W
    row = offs // W
    col = offs - row * W
    d_row = tl.abs(row[None, :] - q_row[:, None]).to(ACC)
    d_col = tl.abs(col[None, :] - q_col[:, None]).to(ACC)
    if NORMALIZED:
        d_row = d_row * inv_hm1
        d_col = d_col * inv_wm1
    t_row = theta_row * d_row
    t_col = theta_col * d_col
    g_row = _gauss(t_row, sigma)
    g_col = _gauss(t_col, sigma)
    return 0.5 * (g_row + g_col), d_row, d_col, t_row, t_col, g_row, g_col


@triton.jit
def _scores(x, q, z, offs, qi, W, alpha, beta, theta_row, theta_col, sigma,
            inv_hm1, inv_wm1, USE_POS: tl.constexpr,
            NORMALIZED: tl.constexpr, ACC: tl.constexpr):
    """q . x_p, z . x_p, D_p and S_p, [G, P], for a tile of positions."""
    sq = tl.sum(x * q[:, :, None], 1)
    sz = tl.sum(x * z[:, :, None], 1)
    if USE_POS:
        dist, _, _, _, _, _, _ = _position(offs, qi, W, theta_row, theta_col,
                                           sigma, inv_hm1, inv_wm1,
                                           NORMALIZED, ACC)
    else:
        dist = tl.full(sq.shape, 1.0, ACC)
    return sq, sz, dist, alpha[:, None] * sq * dist + beta[:, None] * sz


@triton.jit
def _program_pairs(n, groups, cg, G_BLOCK: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """This program's (sample, group) pairs ([G]: row, mask, sample, group)
    and their channels ([G, C]: lanes, mask, index)."""
    rows = tl.program_id(0) * G_BLOCK + tl.arange(0, G_BLOCK)
    rmask = rows < n
    sample = rows // groups
    group = rows - sample * groups
    lanes = tl.arange(0, BLOCK_C)
    gcmask = rmask[:, None] & (lanes < cg)[None, :]
    chans = group[:, None] * cg + lanes[None, :]
    return rows, rmask, sample, group, lanes, gcmask, chans


@triton.jit
def _chunk(P, chunk):
    """The positions [lo, hi) of this program's split."""
    lo = tl.program_id(1) * chunk
    return lo, tl.minimum(lo + chunk, P)


@triton.jit
def _first_split(mask):
    """``mask`` [G] where this program takes its pairs' first split.
    (Broadcast by hand: Triton's interpreter makes a mask of another
    dtype from ``mask & (tl.program_id(1) == 0)``.)"""
    return mask & ((mask.to(tl.int32) * 0 + tl.program_id(1)) == 0)


@triton.jit
def _norm_affine(a_ptr, shift_ptr, chans, gcmask, G_BLOCK: tl.constexpr,
                 BLOCK_C: tl.constexpr, HAS_NORM: tl.constexpr,
                 ACC: tl.constexpr):
    """BatchNorm as x = c * a + shift on the pairs' channels, [G, C]."""
    a = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    shift = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    if HAS_NORM:
        a = tl.load(a_ptr + chans, mask=gcmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + chans, mask=gcmask, other=0.0).to(ACC)
    return a, shift


@triton.jit
def _batch_statistics(part_ptr, chans, gcmask, C, B, P, chunk, psplits,
                      samples, bn_splits, G_BLOCK: tl.constexpr,
                      BLOCK_C: tl.constexpr, BN_SPLIT_BLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    """BatchNorm's batch statistics, second level: the partials of
    :func:`channel_partial_kernel` ([bn_splits, 2, C]: mean and M2 of each
    split) merged into each channel's mean and biased variance, [G, C]
    (count-weighted mean; M2 = sum of M2 + sum of count * (mean_s -
    mean)^2). The same reduction in every program merging a channel: the
    same bits."""
    split = tl.arange(0, BN_SPLIT_BLOCK)
    smask = split < bn_splits
    b0 = (split // psplits) * samples
    lo = (split % psplits) * chunk
    count = tl.where(smask, (tl.minimum(b0 + samples, B) - b0) *
                     (tl.minimum(lo + chunk, P) - lo), 0).to(ACC)  # [S]
    mask = smask[None, :, None] & gcmask[:, None, :]  # [G, S, C]
    part = part_ptr + split[None, :, None] * 2 * C + chans[:, None, :]
    split_mean = tl.load(part, mask=mask, other=0.0)
    split_m2 = tl.load(part + C, mask=mask, other=0.0)
    total = tl.sum(count, 0)
    mean = tl.sum(split_mean * count[None, :, None], 1) / total
    d = split_mean - mean[:, None, :]
    m2 = tl.sum(split_m2 + d * d * count[None, :, None], 1)
    return mean, m2 / total


@triton.jit
def _folded_norm(a_ptr, shift_ptr, part_ptr, weight_ptr, bias_ptr, chans,
                 gcmask, C, B, P, bn_chunk, psplits, samples, bn_splits,
                 bn_eps, G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                 HAS_NORM: tl.constexpr, BN_TRAIN: tl.constexpr,
                 BN_SPLIT_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm as x = c * a + shift on the pairs' channels, [G, C], with
    the batch mean and 1/std: from the batch statistics' partials when
    BatchNorm trains (a = invstd * weight, shift = bias - mean * a), else
    the a and shift given."""
    if BN_TRAIN:
        mean, var = _batch_statistics(part_ptr, chans, gcmask, C, B, P,
                                      bn_chunk, psplits, samples, bn_splits,
                                      G_BLOCK, BLOCK_C, BN_SPLIT_BLOCK, ACC)
        invstd = 1.0 / tl.sqrt(var + bn_eps)
        weight = tl.load(weight_ptr + chans, mask=gcmask, other=1.0).to(ACC)
        bias = tl.load(bias_ptr + chans, mask=gcmask, other=0.0).to(ACC)
        a = invstd * weight
        shift = bias - mean * a
    else:
        a, shift = _norm_affine(a_ptr, shift_ptr, chans, gcmask, G_BLOCK,
                                BLOCK_C, HAS_NORM, ACC)
        mean = tl.zeros([G_BLOCK, BLOCK_C], ACC)
        var = tl.zeros([G_BLOCK, BLOCK_C], ACC)
        invstd = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    return a, shift, mean, var, invstd


@triton.jit
def _pair_params(group, rmask, lam_ptr, xi_ptr, beta_ptr, alpha_ptr,
                 theta_ptr, sigma_ptr, ACC: tl.constexpr):
    """PRM's parameters: per pair [G] (lambda, xi, beta, alpha), and theta
    and sigma."""
    lam = tl.load(lam_ptr + group, mask=rmask, other=0.0).to(ACC)
    xi = tl.load(xi_ptr + group, mask=rmask, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + group, mask=rmask, other=0.0).to(ACC)
    alpha = tl.load(alpha_ptr + group, mask=rmask, other=0.0).to(ACC)
    theta_row = tl.load(theta_ptr).to(ACC)
    theta_col = tl.load(theta_ptr + 1).to(ACC)
    sigma = tl.load(sigma_ptr).to(ACC)
    return lam, xi, beta, alpha, theta_row, theta_col, sigma


@triton.jit
def _split_parts(rows, rmask, splits, SPLIT_BLOCK: tl.constexpr):
    """Where the pairs' partials are: [G, S] indices into a [n, splits,
    ...] scratch, and their mask."""
    split = tl.arange(0, SPLIT_BLOCK)
    part = rows[:, None] * splits + split[None, :]
    return part, rmask[:, None] & (split < splits)[None, :]


@triton.jit
def _query_and_context(x_ptr, x_base, chans, sx_c, sx_p, a, shift, rows,
                       rmask, lanes, gcmask, cg, inv_p, splits, sum_ptr,
                       best_ptr, idx_ptr, G_BLOCK: tl.constexpr,
                       BLOCK_C: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
                       HAS_NORM: tl.constexpr, ACC: tl.constexpr):
    """fwd_sums' partials combined: the query position (the first maximum
    of the channel sum: the lowest position among the splits' maxima that
    equal the largest; a NaN split never wins, as in a sweep), the query
    vector q and the channel means z."""
    part, smask = _split_parts(rows, rmask, splits, SPLIT_BLOCK)  # [G, S]
    total = tl.sum(tl.load(sum_ptr + part[:, :, None] * cg +
                           lanes[None, None, :],
                           mask=smask[:, :, None] & gcmask[:, None, :],
                           other=0.0), 1)  # [G, C]
    split_best = tl.load(best_ptr + part, mask=smask, other=_NEG_INF)
    split_best = tl.where(split_best == split_best, split_best, _NEG_INF)
    split_qi = tl.load(idx_ptr + part, mask=smask, other=0)
    best = tl.max(split_best, 1)
    qi = tl.min(tl.where(split_best == best[:, None], split_qi, 2147483647),
                1)
    z = total * inv_p  # [G, C]
    q = tl.load(x_ptr + x_base[:, None] + chans * sx_c + qi[:, None] * sx_p,
                mask=gcmask, other=0.0).to(ACC)
    if HAS_NORM:
        q = tl.where(gcmask, q * a + shift, 0.0)
    return qi, q, z


@triton.jit
def fwd_sums_kernel(
        x_ptr, a_ptr, shift_ptr, sum_ptr, best_ptr, idx_ptr,
        bn_part_ptr, bn_weight_ptr, bn_bias_ptr, C, B, bn_chunk, psplits,
        samples, bn_splits, bn_eps,
        save_mean_ptr, save_var_ptr, save_invstd_ptr,
        n, groups, cg, P, chunk, splits, sx_b, sx_c, sx_p,
        HAS_NORM: tl.constexpr, BN_TRAIN: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr, BN_SPLIT_BLOCK: tl.constexpr,
        ACC: tl.constexpr):
    """Per (pair, split): the chunk's channel sums [cg] and the first
    maximum of its channel sum over positions and where it is. When
    BatchNorm trains, the programs of sample 0's split 0 write its batch
    mean, variance and 1/std."""
    rows, rmask, sample, group, lanes, gcmask, chans = _program_pairs(
        n, groups, cg, G_BLOCK, BLOCK_C)
    a, shift, bn_mean, bn_var, bn_invstd = _folded_norm(
        a_ptr, shift_ptr, bn_part_ptr, bn_weight_ptr, bn_bias_ptr, chans,
        gcmask, C, B, P, bn_chunk, psplits, samples, bn_splits, bn_eps,
        G_BLOCK, BLOCK_C, HAS_NORM, BN_TRAIN, BN_SPLIT_BLOCK, ACC)
    if BN_TRAIN:
        first = gcmask & _first_split(sample == 0)[:, None]
        tl.store(save_mean_ptr + chans, bn_mean, mask=first)
        tl.store(save_var_ptr + chans, bn_var, mask=first)
        tl.store(save_invstd_ptr + chans, bn_invstd, mask=first)
    x_base = sample.to(tl.int64) * sx_b  # [G]
    lo, hi = _chunk(P, chunk)
    best = tl.full([G_BLOCK], _NEG_INF, ACC)
    qi = tl.zeros([G_BLOCK], tl.int32)
    total = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    for p0 in range(lo, hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        total += tl.sum(x, 2)
        colsum = tl.where(pmask[None, :], tl.sum(x, 1), _NEG_INF)  # [G, P]
        tile_best = tl.max(colsum, 1)
        tile_qi = tl.argmax(colsum, 1).to(tl.int32) + p0
        better = tile_best > best  # strict: the first maximum wins
        qi = tl.where(better, tile_qi, qi)
        best = tl.where(better, tile_best, best)
    part = rows * splits + tl.program_id(1)
    tl.store(sum_ptr + part[:, None] * cg + lanes[None, :], total,
             mask=gcmask)
    tl.store(best_ptr + part, best, mask=rmask)
    tl.store(idx_ptr + part, qi, mask=rmask)


@triton.jit
def fwd_stats_kernel(
        x_ptr, a_ptr, shift_ptr, alpha_ptr, beta_ptr, theta_ptr, sigma_ptr,
        sum_ptr, best_ptr, idx_ptr, s_ptr,
        bn_part_ptr, bn_weight_ptr, bn_bias_ptr, C, B, bn_chunk, psplits,
        samples, bn_splits, bn_eps,
        n, groups, cg, P, W, chunk, splits, inv_p, inv_hm1, inv_wm1,
        sx_b, sx_c, sx_p,
        HAS_NORM: tl.constexpr, BN_TRAIN: tl.constexpr, USE_POS: tl.constexpr,
        NORMALIZED: tl.constexpr, G_BLOCK: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr, BN_SPLIT_BLOCK: tl.constexpr,
        ACC: tl.constexpr):
    """Per (pair, split): the mean and M2 of S over the chunk (tiles merged
    as Chan et al.) into ``s_ptr`` [n, splits, 2]."""
    rows, rmask, sample, group, lanes, gcmask, chans = _program_pairs(
        n, groups, cg, G_BLOCK, BLOCK_C)
    a, shift, bn_mean, bn_var, bn_invstd = _folded_norm(
        a_ptr, shift_ptr, bn_part_ptr, bn_weight_ptr, bn_bias_ptr, chans,
        gcmask, C, B, P, bn_chunk, psplits, samples, bn_splits, bn_eps,
        G_BLOCK, BLOCK_C, HAS_NORM, BN_TRAIN, BN_SPLIT_BLOCK, ACC)
    alpha = tl.load(alpha_ptr + group, mask=rmask, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + group, mask=rmask, other=0.0).to(ACC)
    theta_row = tl.load(theta_ptr).to(ACC)
    theta_col = tl.load(theta_ptr + 1).to(ACC)
    sigma = tl.load(sigma_ptr).to(ACC)
    x_base = sample.to(tl.int64) * sx_b
    qi, q, z = _query_and_context(x_ptr, x_base, chans, sx_c, sx_p, a,
                                  shift, rows, rmask, lanes, gcmask, cg,
                                  inv_p, splits, sum_ptr, best_ptr, idx_ptr,
                                  G_BLOCK, BLOCK_C, SPLIT_BLOCK, HAS_NORM,
                                  ACC)
    lo, hi = _chunk(P, chunk)
    mean = tl.zeros([G_BLOCK], ACC)
    m2 = tl.zeros([G_BLOCK], ACC)
    seen = tl.zeros([], ACC)
    for p0 in range(lo, hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        _, _, _, s = _scores(x, q, z, offs, qi, W, alpha, beta, theta_row,
                             theta_col, sigma, inv_hm1, inv_wm1, USE_POS,
                             NORMALIZED, ACC)
        count = tl.sum(pmask.to(ACC), 0)
        tile_mean = tl.sum(tl.where(pmask[None, :], s, 0.0), 1) / count
        d = tl.where(pmask[None, :], s - tile_mean[:, None], 0.0)
        delta = tile_mean - mean
        mean += delta * count / (seen + count)
        m2 += tl.sum(d * d, 1) + delta * delta * seen * count / (seen + count)
        seen += count
    part = rows * splits + tl.program_id(1)
    tl.store(s_ptr + 2 * part, mean, mask=rmask)
    tl.store(s_ptr + 2 * part + 1, m2, mask=rmask)


@triton.jit
def _s_statistics(s_ptr, rows, rmask, P, chunk, splits, inv_pm1,
                  SPLIT_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """fwd_stats' partials merged: S's mean (count-weighted) and unbiased
    std (M2 = sum of M2 + sum of count * (mean_s - mean)^2) over all
    positions."""
    part, smask = _split_parts(rows, rmask, splits, SPLIT_BLOCK)  # [G, S]
    split = tl.arange(0, SPLIT_BLOCK)
    count = tl.where(split < splits, tl.minimum(chunk, P - split * chunk),
                     0).to(ACC)  # [S]
    split_mean = tl.load(s_ptr + 2 * part, mask=smask, other=0.0)
    split_m2 = tl.load(s_ptr + 2 * part + 1, mask=smask, other=0.0)
    mean = tl.sum(split_mean * count[None, :], 1) / P
    d = split_mean - mean[:, None]
    m2 = tl.sum(split_m2 + d * d * count[None, :], 1)
    std = tl.sqrt(tl.maximum(m2 * inv_pm1, _TINY_VAR))
    return mean, std


@triton.jit
def fwd_out_kernel(
        x_ptr, id_ptr, y_ptr, a_ptr, shift_ptr, lam_ptr, xi_ptr, beta_ptr,
        alpha_ptr, theta_ptr, sigma_ptr, sum_ptr, best_ptr, idx_ptr, s_ptr,
        qi_ptr, q_ptr, z_ptr, stats_ptr,
        bn_part_ptr, bn_weight_ptr, bn_bias_ptr, C, B, bn_chunk, psplits,
        samples, bn_splits, bn_eps,
        n, groups, cg, P, W, chunk, splits, inv_p, inv_pm1, inv_hm1,
        inv_wm1, eps, sx_b, sx_c, sx_p, si_b, si_c, si_p, sy_b, sy_c, sy_p,
        HAS_NORM: tl.constexpr, BN_TRAIN: tl.constexpr, HAS_ID: tl.constexpr,
        RELU: tl.constexpr,
        USE_POS: tl.constexpr, USE_NORM: tl.constexpr,
        NORMALIZED: tl.constexpr, KEEP_STATE: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr, BN_SPLIT_BLOCK: tl.constexpr,
        ACC: tl.constexpr):
    """y = x * gate (+ identity, ReLU) over the chunk; split 0 also writes
    the state backward reads."""
    rows, rmask, sample, group, lanes, gcmask, chans = _program_pairs(
        n, groups, cg, G_BLOCK, BLOCK_C)
    a, shift, bn_mean, bn_var, bn_invstd = _folded_norm(
        a_ptr, shift_ptr, bn_part_ptr, bn_weight_ptr, bn_bias_ptr, chans,
        gcmask, C, B, P, bn_chunk, psplits, samples, bn_splits, bn_eps,
        G_BLOCK, BLOCK_C, HAS_NORM, BN_TRAIN, BN_SPLIT_BLOCK, ACC)
    lam, xi, beta, alpha, theta_row, theta_col, sigma = _pair_params(
        group, rmask, lam_ptr, xi_ptr, beta_ptr, alpha_ptr, theta_ptr,
        sigma_ptr, ACC)
    x_base = sample.to(tl.int64) * sx_b
    qi, q, z = _query_and_context(x_ptr, x_base, chans, sx_c, sx_p, a,
                                  shift, rows, rmask, lanes, gcmask, cg,
                                  inv_p, splits, sum_ptr, best_ptr, idx_ptr,
                                  G_BLOCK, BLOCK_C, SPLIT_BLOCK, HAS_NORM,
                                  ACC)
    if USE_NORM:
        mean, std = _s_statistics(s_ptr, rows, rmask, P, chunk, splits,
                                  inv_pm1, SPLIT_BLOCK, ACC)
        gain = lam / (std + eps)
    else:
        mean = tl.zeros([G_BLOCK], ACC)
        std = tl.full([G_BLOCK], 1.0, ACC)
        gain = lam

    if KEEP_STATE:
        first = _first_split(rmask)
        tl.store(qi_ptr + rows, qi.to(tl.int64), mask=first)
        state = rows[:, None] * cg + lanes[None, :]
        tl.store(q_ptr + state, q, mask=gcmask & first[:, None])
        tl.store(z_ptr + state, z, mask=gcmask & first[:, None])
        tl.store(stats_ptr + 2 * rows, mean, mask=first)
        tl.store(stats_ptr + 2 * rows + 1, std, mask=first)

    s64 = sample.to(tl.int64)
    y_base = s64 * sy_b
    id_base = s64 * si_b
    lo, hi = _chunk(P, chunk)
    for p0 in range(lo, hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        _, _, _, s = _scores(x, q, z, offs, qi, W, alpha, beta, theta_row,
                             theta_col, sigma, inv_hm1, inv_wm1, USE_POS,
                             NORMALIZED, ACC)
        gate = tl.sigmoid(xi[:, None] + (s - mean[:, None]) * gain[:, None])
        out = x * gate[:, None, :]
        if HAS_ID:
            out += tl.load(id_ptr + id_base[:, None, None] +
                           chans[:, :, None] * si_c +
                           offs[None, None, :] * si_p, mask=mask,
                           other=0.0).to(ACC)
        if RELU:
            out = tl.where(out < 0.0, 0.0, out)  # NaN stays NaN
        tl.store(y_ptr + y_base[:, None, None] + chans[:, :, None] * sy_c +
                 offs[None, None, :] * sy_p,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upstream(gy_ptr, gy_base, y_ptr, y_base, chans, offs, sg_c, sg_p, sy_c,
              sy_p, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    """dL/dy [G, C, P], masked by the fused ReLU (as threshold_backward:
    y > 0)."""
    g = tl.load(gy_ptr + gy_base[:, None, None] + chans[:, :, None] * sg_c +
                offs[None, None, :] * sg_p, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.load(y_ptr + y_base[:, None, None] + chans[:, :, None] * sy_c +
                    offs[None, None, :] * sy_p, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    return g


@triton.jit
def _saved_state(qi_ptr, q_ptr, z_ptr, stats_ptr, rows, rmask, lanes,
                 gcmask, cg, lam, eps, G_BLOCK: tl.constexpr,
                 USE_NORM: tl.constexpr, ACC: tl.constexpr):
    """Forward's state: qi, q, z, S's mean, 1 / (std + eps) and the gain."""
    qi = tl.load(qi_ptr + rows, mask=rmask, other=0).to(tl.int32)
    state = rows[:, None] * cg + lanes[None, :]
    q = tl.load(q_ptr + state, mask=gcmask, other=0.0).to(ACC)
    z = tl.load(z_ptr + state, mask=gcmask, other=0.0).to(ACC)
    mean = tl.load(stats_ptr + 2 * rows, mask=rmask, other=0.0).to(ACC)
    std = tl.load(stats_ptr + 2 * rows + 1, mask=rmask, other=1.0).to(ACC)
    if USE_NORM:
        inv = 1.0 / (std + eps)
    else:
        inv = tl.full([G_BLOCK], 1.0, ACC)
    return qi, q, z, mean, std, inv, lam * inv


@triton.jit
def bwd_sums_kernel(
        gy_ptr, y_ptr, x_ptr, a_ptr, shift_ptr, lam_ptr, xi_ptr, beta_ptr,
        alpha_ptr, theta_ptr, sigma_ptr, qi_ptr, q_ptr, z_ptr, stats_ptr,
        pair_ptr, chan_ptr,
        n, groups, cg, P, W, chunk, splits, inv_hm1, inv_wm1, eps,
        sg_b, sg_c, sg_p, sy_b, sy_c, sy_p, sx_b, sx_c, sx_p,
        HAS_NORM: tl.constexpr, RELU: tl.constexpr, USE_POS: tl.constexpr,
        USE_NORM: tl.constexpr, NORMALIZED: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        ACC: tl.constexpr):
    """Backward's first sweep over the chunk. dL/dS_p = gain * r_p + k1 +
    k2 * (S_p - mean), with r the pre-sigmoid gradient and k1, k2 known
    only once every position is seen; every sum backward needs is sum_p
    dL/dS_p f_p for some f, so it is kept as three sums (of r f, f and
    (S - mean) f): per pair into ``pair_ptr`` [n, splits, 32], per channel
    into ``chan_ptr`` [n, splits, 6, cg]."""
    rows, rmask, sample, group, lanes, gcmask, chans = _program_pairs(
        n, groups, cg, G_BLOCK, BLOCK_C)
    a, shift = _norm_affine(a_ptr, shift_ptr, chans, gcmask, G_BLOCK,
                            BLOCK_C, HAS_NORM, ACC)
    lam, xi, beta, alpha, theta_row, theta_col, sigma = _pair_params(
        group, rmask, lam_ptr, xi_ptr, beta_ptr, alpha_ptr, theta_ptr,
        sigma_ptr, ACC)
    qi, q, z, mean, std, inv, gain = _saved_state(
        qi_ptr, q_ptr, z_ptr, stats_ptr, rows, rmask, lanes, gcmask, cg, lam,
        eps, G_BLOCK, USE_NORM, ACC)
    s64 = sample.to(tl.int64)
    x_base = s64 * sx_b
    gy_base = s64 * sg_b
    y_base = s64 * sy_b

    sum_r = tl.zeros([G_BLOCK], ACC)
    sum_rc = tl.zeros([G_BLOCK], ACC)
    # per channel, f = D_p x_cp (query) and x_cp (context)
    kq_r = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kq_1 = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kq_c = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_r = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_1 = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_c = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    # per pair, f = D sq (alpha), sz (beta), dS/dtheta_row, dS/dtheta_col,
    # dS/dsigma
    al_r = tl.zeros([G_BLOCK], ACC)
    al_1 = tl.zeros([G_BLOCK], ACC)
    al_c = tl.zeros([G_BLOCK], ACC)
    be_r = tl.zeros([G_BLOCK], ACC)
    be_1 = tl.zeros([G_BLOCK], ACC)
    be_c = tl.zeros([G_BLOCK], ACC)
    tr_r = tl.zeros([G_BLOCK], ACC)
    tr_1 = tl.zeros([G_BLOCK], ACC)
    tr_c = tl.zeros([G_BLOCK], ACC)
    tc_r = tl.zeros([G_BLOCK], ACC)
    tc_1 = tl.zeros([G_BLOCK], ACC)
    tc_c = tl.zeros([G_BLOCK], ACC)
    sm_r = tl.zeros([G_BLOCK], ACC)
    sm_1 = tl.zeros([G_BLOCK], ACC)
    sm_c = tl.zeros([G_BLOCK], ACC)
    inv_var = 1.0 / (sigma * sigma)
    lo, hi = _chunk(P, chunk)
    for p0 in range(lo, hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        g = _upstream(gy_ptr, gy_base, y_ptr, y_base, chans, offs, sg_c, sg_p,
                      sy_c, sy_p, mask, RELU, ACC)
        sq = tl.sum(x * q[:, :, None], 1)  # [G, P]
        sz = tl.sum(x * z[:, :, None], 1)
        if USE_POS:
            dist, d_row, d_col, t_row, t_col, g_row, g_col = _position(
                offs, qi, W, theta_row, theta_col, sigma, inv_hm1, inv_wm1,
                NORMALIZED, ACC)
        else:
            dist = tl.full([G_BLOCK, BLOCK_P], 1.0, ACC)
        s = alpha[:, None] * sq * dist + beta[:, None] * sz
        centered = tl.where(pmask[None, :], s - mean[:, None], 0.0)
        gate = tl.sigmoid(xi[:, None] + centered * gain[:, None])
        r = tl.sum(g * x, 1) * gate * (1.0 - gate)  # [G, P], 0 off the map
        sum_r += tl.sum(r, 1)
        sum_rc += tl.sum(r * centered, 1)
        one = pmask.to(ACC)[None, :]
        fq = x * dist[:, None, :]
        kq_r += tl.sum(fq * r[:, None, :], 2)
        kq_1 += tl.sum(fq, 2)
        kq_c += tl.sum(fq * centered[:, None, :], 2)
        kz_r += tl.sum(x * r[:, None, :], 2)
        kz_1 += tl.sum(x, 2)
        kz_c += tl.sum(x * centered[:, None, :], 2)
        f = sq * dist * one
        al_r += tl.sum(f * r, 1)
        al_1 += tl.sum(f, 1)
        al_c += tl.sum(f * centered, 1)
        f = sz * one
        be_r += tl.sum(f * r, 1)
        be_1 += tl.sum(f, 1)
        be_c += tl.sum(f * centered, 1)
        if USE_POS:
            # dS/dD = alpha sq; dD/dtheta_row = G'(t_row) d_row / 2 with
            # G'(t) = -t G / sigma^2; dG/dsigma = G (t^2 / sigma^2 - 1) / sigma
            ds_dd = alpha[:, None] * sq * one
            f = ds_dd * (-0.5 * t_row * g_row * inv_var) * d_row
            tr_r += tl.sum(f * r, 1)
            tr_1 += tl.sum(f, 1)
            tr_c += tl.sum(f * centered, 1)
            f = ds_dd * (-0.5 * t_col * g_col * inv_var) * d_col
            tc_r += tl.sum(f * r, 1)
            tc_1 += tl.sum(f, 1)
            tc_c += tl.sum(f * centered, 1)
            f = ds_dd * 0.5 * (g_row * (t_row * t_row * inv_var - 1.0) +
                               g_col * (t_col * t_col * inv_var - 1.0)) / sigma
            sm_r += tl.sum(f * r, 1)
            sm_1 += tl.sum(f, 1)
            sm_c += tl.sum(f * centered, 1)

    part = rows * splits + tl.program_id(1)
    pp = pair_ptr + part * _PAIR_STRIDE
    tl.store(pp, sum_r, mask=rmask)
    tl.store(pp + 1, sum_rc, mask=rmask)
    tl.store(pp + 2, al_r, mask=rmask)
    tl.store(pp + 3, al_1, mask=rmask)
    tl.store(pp + 4, al_c, mask=rmask)
    tl.store(pp + 5, be_r, mask=rmask)
    tl.store(pp + 6, be_1, mask=rmask)
    tl.store(pp + 7, be_c, mask=rmask)
    tl.store(pp + 8, tr_r, mask=rmask)
    tl.store(pp + 9, tr_1, mask=rmask)
    tl.store(pp + 10, tr_c, mask=rmask)
    tl.store(pp + 11, tc_r, mask=rmask)
    tl.store(pp + 12, tc_1, mask=rmask)
    tl.store(pp + 13, tc_c, mask=rmask)
    tl.store(pp + 14, sm_r, mask=rmask)
    tl.store(pp + 15, sm_1, mask=rmask)
    tl.store(pp + 16, sm_c, mask=rmask)
    cp = chan_ptr + (part[:, None] * _CHANNEL_SUMS) * cg + lanes[None, :]
    tl.store(cp, kq_r, mask=gcmask)
    tl.store(cp + cg, kq_1, mask=gcmask)
    tl.store(cp + 2 * cg, kq_c, mask=gcmask)
    tl.store(cp + 3 * cg, kz_r, mask=gcmask)
    tl.store(cp + 4 * cg, kz_1, mask=gcmask)
    tl.store(cp + 5 * cg, kz_c, mask=gcmask)


@triton.jit
def _pair_sum(pair_ptr, part, smask, k: tl.constexpr):
    """Sum ``k`` of bwd_sums' per-pair partials over the splits, [G]."""
    return tl.sum(tl.load(pair_ptr + part * _PAIR_STRIDE + k, mask=smask,
                          other=0.0), 1)


@triton.jit
def _channel_sum(chan_ptr, part, smask, lanes, gcmask, cg, k: tl.constexpr):
    """Sum ``k`` of bwd_sums' per-channel partials over the splits,
    [G, C]."""
    return tl.sum(tl.load(chan_ptr + (part[:, :, None] * _CHANNEL_SUMS + k) *
                          cg + lanes[None, None, :],
                          mask=smask[:, :, None] & gcmask[:, None, :],
                          other=0.0), 1)


@triton.jit
def _combined(pair_ptr, part, smask, k: tl.constexpr, gain, k1, k2):
    """sum_p dL/dS_p f_p from the three sums of f (at k, k + 1, k + 2)."""
    return (gain * _pair_sum(pair_ptr, part, smask, k) +
            k1 * _pair_sum(pair_ptr, part, smask, k + 1) +
            k2 * _pair_sum(pair_ptr, part, smask, k + 2))


@triton.jit
def bwd_out_kernel(
        gy_ptr, y_ptr, x_ptr, a_ptr, shift_ptr, mean_ptr, invstd_ptr,
        lam_ptr, xi_ptr, beta_ptr, alpha_ptr, theta_ptr, sigma_ptr, qi_ptr,
        q_ptr, z_ptr, stats_ptr, pair_ptr, chan_ptr,
        gx_ptr, gid_ptr, pgrad_ptr, bn_sums_ptr,
        n, groups, cg, C, P, W, chunk, splits, inv_p, inv_pm1, inv_hm1,
        inv_wm1, eps,
        sg_b, sg_c, sg_p, sy_b, sy_c, sy_p, sx_b, sx_c, sx_p,
        so_b, so_c, so_p, sd_b, sd_c, sd_p,
        HAS_NORM: tl.constexpr, NORM_EVAL: tl.constexpr,
        WRITE_ID: tl.constexpr, RELU: tl.constexpr, USE_POS: tl.constexpr,
        USE_NORM: tl.constexpr, NORMALIZED: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Writes dL/dx over the chunk (dL/dc with BatchNorm in eval; dL/dx for
    BatchNorm in training, which ``bn_backward_kernel`` turns into dL/dc),
    the masked upstream gradient (the shortcut's) when asked; split 0
    writes PRM's parameter gradients of each pair into ``pgrad`` [n, 7];
    with BatchNorm, each split its per-(sample, channel) sums of dL/dx and
    dL/dx * xhat into ``bn_sums`` [b, splits, 2, C]."""
    rows, rmask, sample, group, lanes, gcmask, chans = _program_pairs(
        n, groups, cg, G_BLOCK, BLOCK_C)
    a, shift = _norm_affine(a_ptr, shift_ptr, chans, gcmask, G_BLOCK,
                            BLOCK_C, HAS_NORM, ACC)
    lam, xi, beta, alpha, theta_row, theta_col, sigma = _pair_params(
        group, rmask, lam_ptr, xi_ptr, beta_ptr, alpha_ptr, theta_ptr,
        sigma_ptr, ACC)
    qi, q, z, mean, std, inv, gain = _saved_state(
        qi_ptr, q_ptr, z_ptr, stats_ptr, rows, rmask, lanes, gcmask, cg, lam,
        eps, G_BLOCK, USE_NORM, ACC)

    part, smask = _split_parts(rows, rmask, splits, SPLIT_BLOCK)  # [G, S]
    sum_r = _pair_sum(pair_ptr, part, smask, 0)
    sum_rc = _pair_sum(pair_ptr, part, smask, 1)
    grad_lam = inv * sum_rc  # sum_p r_p (S_p - mean) / (std + eps)
    if USE_NORM:
        k1 = -gain * sum_r * inv_p
        k2 = tl.where(std > _TINY_STD, -gain * grad_lam * inv_pm1 / std, 0.0)
        if P == 1:  # the normalized value is constant 0
            gain = 0.0 * gain
            k1 = 0.0 * k1
            k2 = 0.0 * k2
    else:
        k1 = tl.zeros([G_BLOCK], ACC)
        k2 = tl.zeros([G_BLOCK], ACC)
    first = _first_split(rmask)
    pg = pgrad_ptr + rows * 7
    tl.store(pg, grad_lam, mask=first)
    tl.store(pg + 1, sum_r, mask=first)
    tl.store(pg + 2, _combined(pair_ptr, part, smask, 5, gain, k1,
                               k2), mask=first)
    tl.store(pg + 3, _combined(pair_ptr, part, smask, 2, gain, k1,
                               k2), mask=first)
    tl.store(pg + 4, _combined(pair_ptr, part, smask, 8, gain, k1,
                               k2), mask=first)
    tl.store(pg + 5, _combined(pair_ptr, part, smask, 11, gain, k1,
                               k2), mask=first)
    tl.store(pg + 6, _combined(pair_ptr, part, smask, 14, gain, k1,
                               k2), mask=first)
    grad_query = alpha[:, None] * (
        gain[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask,
                                     cg, 0) +
        k1[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask, cg,
                                   1) +
        k2[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask, cg,
                                   2))  # [G, C]
    grad_context = beta[:, None] * (
        gain[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask,
                                     cg, 3) +
        k1[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask, cg,
                                   4) +
        k2[:, None] * _channel_sum(chan_ptr, part, smask, lanes, gcmask, cg,
                                   5))

    # dL/dx = g gate + dL/dS (alpha D q + beta z) + dL/dz / P
    # (+ dL/dq at the query position)
    if HAS_NORM:
        bn_mean = tl.load(mean_ptr + chans, mask=gcmask, other=0.0).to(ACC)
        bn_invstd = tl.load(invstd_ptr + chans, mask=gcmask,
                            other=0.0).to(ACC)
    sum_gx = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    sum_gx_xhat = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    s64 = sample.to(tl.int64)
    x_base = s64 * sx_b
    gy_base = s64 * sg_b
    y_base = s64 * sy_b
    out_base = s64 * so_b
    gid_base = s64 * sd_b
    key_q = alpha[:, None] * q  # [G, C]
    key_z = beta[:, None] * z
    lo, hi = _chunk(P, chunk)
    for p0 in range(lo, hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        g = _upstream(gy_ptr, gy_base, y_ptr, y_base, chans, offs, sg_c, sg_p,
                      sy_c, sy_p, mask, RELU, ACC)
        sq, sz, dist, s = _scores(x, q, z, offs, qi, W, alpha, beta,
                                  theta_row, theta_col, sigma, inv_hm1,
                                  inv_wm1, USE_POS, NORMALIZED, ACC)
        centered = s - mean[:, None]
        gate = tl.sigmoid(xi[:, None] + centered * gain[:, None])
        r = tl.sum(g * x, 1) * gate * (1.0 - gate)
        grad_s = tl.where(pmask[None, :], gain[:, None] * r + k1[:, None] +
                          k2[:, None] * centered, 0.0)  # [G, P]
        gx = (g * gate[:, None, :] +
              grad_s[:, None, :] * (key_q[:, :, None] * dist[:, None, :] +
                                    key_z[:, :, None]) +
              grad_context[:, :, None] * inv_p)
        gx += tl.where(offs[None, None, :] == qi[:, None, None],
                       grad_query[:, :, None], 0.0)
        gx = tl.where(mask, gx, 0.0)
        if HAS_NORM:
            # xhat from x = c a + shift: (x - bias) / weight would need
            # weight != 0; c is re-read instead (it is in L2 or cache)
            c = tl.load(x_ptr + x_base[:, None, None] +
                        chans[:, :, None] * sx_c + offs[None, None, :] * sx_p,
                        mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, (c - bn_mean[:, :, None]) *
                            bn_invstd[:, :, None], 0.0)
            sum_gx += tl.sum(gx, 2)
            sum_gx_xhat += tl.sum(gx * xhat, 2)
            if NORM_EVAL:
                gx = gx * a[:, :, None]  # dL/dc = a dL/dx
        tl.store(gx_ptr + out_base[:, None, None] + chans[:, :, None] * so_c +
                 offs[None, None, :] * so_p,
                 gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if WRITE_ID:
            tl.store(gid_ptr + gid_base[:, None, None] +
                     chans[:, :, None] * sd_c + offs[None, None, :] * sd_p,
                     g.to(gid_ptr.dtype.element_ty), mask=mask)
    if HAS_NORM:
        sums = (bn_sums_ptr + (s64[:, None] * splits + tl.program_id(1)) * 2 *
                C + chans)
        tl.store(sums, sum_gx, mask=gcmask)
        tl.store(sums + C, sum_gx_xhat, mask=gcmask)


@triton.jit
def channel_partial_kernel(c_ptr, part_ptr, C, B, P, chunk, psplits,
                           samples, s_b, s_c, s_p, BLOCK_CH: tl.constexpr,
                           BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm's batch statistics, first level: program (i, j) takes
    BLOCK_CH channels of split j = (samples block, positions chunk) and
    writes their mean and M2 (Chan) into ``part_ptr`` [splits, 2, C]."""
    chans = tl.program_id(0) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    cmask = chans < C
    split = tl.program_id(1)
    b0 = (split // psplits) * samples
    lo = (split % psplits) * chunk
    hi = tl.minimum(lo + chunk, P)
    mean = tl.zeros([BLOCK_CH], ACC)
    m2 = tl.zeros([BLOCK_CH], ACC)
    seen = tl.zeros([], ACC)
    for k in range(0, tl.minimum(samples, B - b0)):
        sample_base = (b0 + k).to(tl.int64) * s_b
        for p0 in range(lo, hi, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            pmask = offs < hi
            mask = cmask[:, None] & pmask[None, :]
            v = tl.load(c_ptr + sample_base + chans[:, None] * s_c +
                        offs[None, :] * s_p, mask=mask, other=0.0).to(ACC)
            count = tl.sum(pmask.to(ACC), 0)
            tile_mean = tl.sum(v, 1) / count
            d = tl.where(mask, v - tile_mean[:, None], 0.0)
            delta = tile_mean - mean
            mean += delta * count / (seen + count)
            m2 += tl.sum(d * d, 1) + delta * delta * seen * count / (seen +
                                                                    count)
            seen += count
    out = part_ptr + split * 2 * C + chans
    tl.store(out, mean, mask=cmask)
    tl.store(out + C, m2, mask=cmask)


@triton.jit
def bn_backward_kernel(gx_ptr, c_ptr, coef_ptr, C, P, s_b, s_c, s_p, sc_b,
                       sc_c, sc_p, BLOCK_CH: tl.constexpr,
                       BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm in training: dL/dc = A dL/dx + B c + K per channel, over
    dL/dx in place (``coef`` [3, C] holds A, B, K); program (i, j) takes a
    [BLOCK_CH, BLOCK_P] tile of sample i // cdiv(C, BLOCK_CH)."""
    blocks = tl.cdiv(C, BLOCK_CH)
    sample = tl.program_id(0) // blocks
    chans = (tl.program_id(0) - sample * blocks) * BLOCK_CH + tl.arange(
        0, BLOCK_CH)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = chans < C
    mask = cmask[:, None] & (offs < P)[None, :]
    ca = tl.load(coef_ptr + chans, mask=cmask, other=0.0).to(ACC)
    cb = tl.load(coef_ptr + C + chans, mask=cmask, other=0.0).to(ACC)
    ck = tl.load(coef_ptr + 2 * C + chans, mask=cmask, other=0.0).to(ACC)
    g_ptrs = (gx_ptr + sample.to(tl.int64) * s_b + chans[:, None] * s_c +
              offs[None, :] * s_p)
    gx = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC)
    c = tl.load(c_ptr + sample.to(tl.int64) * sc_b + chans[:, None] * sc_c +
                offs[None, :] * sc_p, mask=mask, other=0.0).to(ACC)
    out = ca[:, None] * gx + cb[:, None] * c + ck[:, None]
    tl.store(g_ptrs, out.to(gx_ptr.dtype.element_ty), mask=mask)
