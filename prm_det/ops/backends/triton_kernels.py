"""PRM's Triton kernels (dot-product mode), launched by :mod:`.triton_backend`.

A program takes ``G_BLOCK`` (sample, group) pairs (one where the maps are
large; several for small maps, so that a program has a tile's worth of
work) and sweeps their [cg, P] blocks in chunks of positions, every channel
of a position in one [G_BLOCK, BLOCK_C, BLOCK_P] tile, so S, the gate and
every per-position gradient are made in registers and never stored:

    forward    pass 1  channel sums -> query position (first argmax), means
               pass 2  S for every position -> its mean and std (Chan)
               pass 3  y = x * gate (+ identity, ReLU), written
    backward   pass 1  dL/dgate, dL/dS's pieces: every sum backward needs,
                       split by linearity so one sweep gives them all
               pass 2  dL/dx (or BatchNorm's dL/dc) written

With BatchNorm folded in, the passes read the convolution's output and
apply the per-channel affine as they load (the normalized map is never
written); its batch statistics come from :func:`channel_stats`. Maps are
read in their own dtype (float16, bfloat16, float32, float64) and
accumulated in ``ACC`` (float32, or float64 for float64 maps). Positions are
addressed as ``p * stride_p``, which holds for contiguous and channels_last
maps alike.
"""
import triton
import triton.language as tl

_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TINY_VAR = tl.constexpr(1e-30)  # as prm_det.ops.reference._TINY_VAR
_TINY_STD = tl.constexpr(1e-15)
_NEG_INF = tl.constexpr(float('-inf'))


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
    """q . x_p, z . x_p, D_p and S_p, [G, P], for a chunk of positions."""
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
def _program_groups(n, groups, cg, a_ptr, shift_ptr, lam_ptr, xi_ptr,
                    beta_ptr, alpha_ptr, theta_ptr, sigma_ptr,
                    HAS_NORM: tl.constexpr, G_BLOCK: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """This program's (sample, group) pairs ([G]: row, mask, sample,
    group), their channels ([G, C]: lanes, mask, index), BatchNorm's affine
    on them and PRM's parameters (per pair, and theta and sigma)."""
    rows = tl.program_id(0) * G_BLOCK + tl.arange(0, G_BLOCK)
    rmask = rows < n
    sample = rows // groups
    group = rows - sample * groups
    lanes = tl.arange(0, BLOCK_C)
    gcmask = rmask[:, None] & (lanes < cg)[None, :]
    chans = group[:, None] * cg + lanes[None, :]
    a = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    shift = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    if HAS_NORM:
        a = tl.load(a_ptr + chans, mask=gcmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + chans, mask=gcmask, other=0.0).to(ACC)
    lam = tl.load(lam_ptr + group, mask=rmask, other=0.0).to(ACC)
    xi = tl.load(xi_ptr + group, mask=rmask, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + group, mask=rmask, other=0.0).to(ACC)
    alpha = tl.load(alpha_ptr + group, mask=rmask, other=0.0).to(ACC)
    theta_row = tl.load(theta_ptr).to(ACC)
    theta_col = tl.load(theta_ptr + 1).to(ACC)
    sigma = tl.load(sigma_ptr).to(ACC)
    return (rows, rmask, sample, group, lanes, gcmask, chans, a, shift, lam,
            xi, beta, alpha, theta_row, theta_col, sigma)


@triton.jit
def prm_forward_kernel(
        x_ptr, id_ptr, y_ptr, a_ptr, shift_ptr, lam_ptr, xi_ptr, beta_ptr,
        alpha_ptr, theta_ptr, sigma_ptr, qi_ptr, q_ptr, z_ptr, stats_ptr,
        n, groups, cg, P, W, inv_p, inv_pm1, inv_hm1, inv_wm1, eps,
        sx_b, sx_c, sx_p, si_b, si_c, si_p, sy_b, sy_c, sy_p,
        HAS_NORM: tl.constexpr, HAS_ID: tl.constexpr, RELU: tl.constexpr,
        USE_POS: tl.constexpr, USE_NORM: tl.constexpr,
        NORMALIZED: tl.constexpr, KEEP_STATE: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        ACC: tl.constexpr):
    (rows, rmask, sample, group, lanes, gcmask, chans, a, shift, lam, xi,
     beta, alpha, theta_row, theta_col, sigma) = _program_groups(
         n, groups, cg, a_ptr, shift_ptr, lam_ptr, xi_ptr, beta_ptr,
         alpha_ptr, theta_ptr, sigma_ptr, HAS_NORM, G_BLOCK, BLOCK_C, ACC)
    x_base = sample.to(tl.int64) * sx_b  # [G]

    # pass 1: channel sums -> first argmax; channel means
    best = tl.full([G_BLOCK], _NEG_INF, ACC)
    qi = tl.zeros([G_BLOCK], tl.int32)
    total = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < P
        mask = gcmask[:, :, None] & pmask[None, None, :]
        x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                       shift, HAS_NORM, ACC)
        total += tl.sum(x, 2)
        colsum = tl.where(pmask[None, :], tl.sum(x, 1), _NEG_INF)  # [G, P]
        chunk_best = tl.max(colsum, 1)
        chunk_qi = tl.argmax(colsum, 1).to(tl.int32) + p0
        better = chunk_best > best  # strict: the first maximum wins
        qi = tl.where(better, chunk_qi, qi)
        best = tl.where(better, chunk_best, best)
    z = total * inv_p  # [G, C]
    q = tl.load(x_ptr + x_base[:, None] + chans * sx_c + qi[:, None] * sx_p,
                mask=gcmask, other=0.0).to(ACC)
    if HAS_NORM:
        q = tl.where(gcmask, q * a + shift, 0.0)

    # pass 2: S's mean and unbiased std (chunks merged as Chan et al.)
    mean = tl.zeros([G_BLOCK], ACC)
    m2 = tl.zeros([G_BLOCK], ACC)
    seen = tl.zeros([], ACC)
    std = tl.full([G_BLOCK], 1.0, ACC)
    if USE_NORM:
        for p0 in range(0, P, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            pmask = offs < P
            mask = gcmask[:, :, None] & pmask[None, None, :]
            x = _load_tile(x_ptr, x_base, chans, sx_c, offs, sx_p, mask, a,
                           shift, HAS_NORM, ACC)
            _, _, _, s = _scores(x, q, z, offs, qi, W, alpha, beta,
                                 theta_row, theta_col, sigma, inv_hm1,
                                 inv_wm1, USE_POS, NORMALIZED, ACC)
            count = tl.sum(pmask.to(ACC), 0)
            chunk_mean = tl.sum(tl.where(pmask[None, :], s, 0.0), 1) / count
            d = tl.where(pmask[None, :], s - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            mean += delta * count / (seen + count)
            m2 += tl.sum(d * d, 1) + delta * delta * seen * count / (seen +
                                                                    count)
            seen += count
        var = m2 * inv_pm1
        std = tl.sqrt(tl.maximum(var, _TINY_VAR))
        gain = lam / (std + eps)
    else:
        gain = lam

    if KEEP_STATE:
        tl.store(qi_ptr + rows, qi.to(tl.int64), mask=rmask)
        state = rows[:, None] * cg + lanes[None, :]
        tl.store(q_ptr + state, q, mask=gcmask)
        tl.store(z_ptr + state, z, mask=gcmask)
        tl.store(stats_ptr + 2 * rows, mean, mask=rmask)
        tl.store(stats_ptr + 2 * rows + 1, std, mask=rmask)

    # pass 3: y = x * gate (+ identity, ReLU)
    y_base = sample.to(tl.int64) * sy_b
    id_base = sample.to(tl.int64) * si_b
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < P
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
def prm_backward_kernel(
        gy_ptr, y_ptr, x_ptr, a_ptr, shift_ptr, mean_ptr, invstd_ptr,
        lam_ptr, xi_ptr, beta_ptr, alpha_ptr, theta_ptr, sigma_ptr, qi_ptr,
        q_ptr, z_ptr, stats_ptr,
        gx_ptr, gid_ptr, pgrad_ptr, bn_sums_ptr,
        n, groups, cg, C, P, W, inv_p, inv_pm1, inv_hm1, inv_wm1, eps,
        sg_b, sg_c, sg_p, sy_b, sy_c, sy_p, sx_b, sx_c, sx_p,
        so_b, so_c, so_p, sd_b, sd_c, sd_p,
        HAS_NORM: tl.constexpr, NORM_EVAL: tl.constexpr,
        WRITE_ID: tl.constexpr, RELU: tl.constexpr, USE_POS: tl.constexpr,
        USE_NORM: tl.constexpr, NORMALIZED: tl.constexpr,
        G_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        ACC: tl.constexpr):
    """Writes dL/dx (dL/dc with BatchNorm in eval; dL/dx for BatchNorm in
    training, which ``bn_backward_kernel`` turns into dL/dc), the masked
    upstream gradient (the shortcut's) when asked, PRM's parameter
    gradients of each (sample, group) into ``pgrad`` [n, 7] and, with
    BatchNorm, the per-(sample, channel) sums of dL/dx and dL/dx * xhat
    into ``bn_sums`` [b, 2, C]."""
    (rows, rmask, sample, group, lanes, gcmask, chans, a, shift, lam, xi,
     beta, alpha, theta_row, theta_col, sigma) = _program_groups(
         n, groups, cg, a_ptr, shift_ptr, lam_ptr, xi_ptr, beta_ptr,
         alpha_ptr, theta_ptr, sigma_ptr, HAS_NORM, G_BLOCK, BLOCK_C, ACC)
    s64 = sample.to(tl.int64)
    x_base = s64 * sx_b
    gy_base = s64 * sg_b
    y_base = s64 * sy_b
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
    gain = lam * inv

    # pass 1. dL/dS_p = gain * r_p + k1 + k2 * (S_p - mean), with r the
    # pre-sigmoid gradient and k1, k2 known only at the end; every sum
    # backward needs is sum_p dL/dS_p f_p for some f, so it is kept as
    # three sums (of r f, f and (S - mean) f) and combined afterwards.
    sum_r = tl.zeros([G_BLOCK], ACC)
    sum_rc = tl.zeros([G_BLOCK], ACC)
    # per channel, f = D_p x_cp (query) and x_cp (context)
    kq_r = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kq_1 = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kq_c = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_r = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_1 = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    kz_c = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    # per (sample, group), f = D sq (alpha), sz (beta), dS/dtheta_row,
    # dS/dtheta_col, dS/dsigma
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
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < P
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
    grad_query = alpha[:, None] * (gain[:, None] * kq_r + k1[:, None] * kq_1 +
                                   k2[:, None] * kq_c)  # [G, C]
    grad_context = beta[:, None] * (gain[:, None] * kz_r +
                                    k1[:, None] * kz_1 + k2[:, None] * kz_c)
    pg = pgrad_ptr + rows * 7
    tl.store(pg, grad_lam, mask=rmask)
    tl.store(pg + 1, sum_r, mask=rmask)
    tl.store(pg + 2, gain * be_r + k1 * be_1 + k2 * be_c, mask=rmask)
    tl.store(pg + 3, gain * al_r + k1 * al_1 + k2 * al_c, mask=rmask)
    tl.store(pg + 4, gain * tr_r + k1 * tr_1 + k2 * tr_c, mask=rmask)
    tl.store(pg + 5, gain * tc_r + k1 * tc_1 + k2 * tc_c, mask=rmask)
    tl.store(pg + 6, gain * sm_r + k1 * sm_1 + k2 * sm_c, mask=rmask)

    # pass 2: dL/dx = g gate + dL/dS (alpha D q + beta z) + dL/dz / P
    # (+ dL/dq at the query position)
    if HAS_NORM:
        bn_mean = tl.load(mean_ptr + chans, mask=gcmask, other=0.0).to(ACC)
        bn_invstd = tl.load(invstd_ptr + chans, mask=gcmask,
                            other=0.0).to(ACC)
    sum_gx = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    sum_gx_xhat = tl.zeros([G_BLOCK, BLOCK_C], ACC)
    out_base = s64 * so_b
    gid_base = s64 * sd_b
    key_q = alpha[:, None] * q  # [G, C]
    key_z = beta[:, None] * z
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pmask = offs < P
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
        sums = bn_sums_ptr + s64[:, None] * 2 * C + chans
        tl.store(sums, sum_gx, mask=gcmask)
        tl.store(sums + C, sum_gx_xhat, mask=gcmask)


@triton.jit
def channel_stats_kernel(c_ptr, mean_ptr, var_ptr, C, B, P, inv_count, s_b,
                         s_c, s_p, BLOCK_CH: tl.constexpr,
                         BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm's batch statistics: the mean and the biased variance of
    BLOCK_CH channels over the batch and the positions (Chan)."""
    chans = tl.program_id(0) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    cmask = chans < C
    mean = tl.zeros([BLOCK_CH], ACC)
    m2 = tl.zeros([BLOCK_CH], ACC)
    seen = tl.zeros([], ACC)
    for i in range(0, B):
        for p0 in range(0, P, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            pmask = offs < P
            mask = cmask[:, None] & pmask[None, :]
            v = tl.load(c_ptr + i * s_b + chans[:, None] * s_c +
                        offs[None, :] * s_p, mask=mask, other=0.0).to(ACC)
            count = tl.sum(pmask.to(ACC), 0)
            chunk_mean = tl.sum(v, 1) / count
            d = tl.where(mask, v - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            mean += delta * count / (seen + count)
            m2 += tl.sum(d * d, 1) + delta * delta * seen * count / (seen +
                                                                    count)
            seen += count
    tl.store(mean_ptr + chans, mean, mask=cmask)
    tl.store(var_ptr + chans, m2 * inv_count, mask=cmask)


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
