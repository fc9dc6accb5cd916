"""The local relation aggregation's Triton kernels
(:mod:`prm_det.ops.local_relation`), launched by :mod:`.local_relation_triton`.

    lr_fwd_kernel       a (sample, group), BLOCK_P output positions and
                        BLOCK_M of the group's value channels: two sweeps
                        over the k x k window's in-map offsets, the first
                        for the largest logit, the second adding
                        exp(logit - max) and exp(logit - max) * value; the
                        output and (channel block 0) the log-sum-exp;
                        with RECOMPUTE (backward), the log-sum-exp given:
                        one sweep of exp(logit - lse) * value, the output
                        and the block's sum of dout * out per position
    lr_bwd_query_kernel output-centric, a (sample, group) and BLOCK_P output
                        positions: each in-map offset's weight recomputed
                        from the log-sum-exp, dlogit = w (sum_c dout_c
                        value_c - D), the query's gradient, and per program
                        the partial sums of the prior's (one per offset)
    lr_bwd_kv_kernel    input-centric, a (sample, group), BLOCK_P input
                        positions of one residue class (x mod stride) and
                        BLOCK_M channels: for each offset d with
                        (x - d) / stride integral and inside the output,
                        the output position o it feeds; the value's
                        gradient (w dout) and (channel block 0) the key's
                        (dlogit dphi/dk)

Every map is contiguous NCHW; the group's channels are a contiguous block
(channel g * m + c of the value, the output and their gradients). No
atomics: each program writes its own positions, the prior's partials are
added by the launcher in a fixed order. Offsets outside the map take no part
(logit -inf, weight 0, never a product with a value loaded for them), so a
NaN or an infinity spreads exactly where it does on the torch backend.

Maps are read in their own dtype and computed in ``ACC`` (float32, or
float64 for float64 values). ``METHOD``: 0 squared difference -(q - k)^2,
1 dot product q k, 2 absolute difference -|q - k|.
"""
import triton
import triton.language as tl


@triton.jit
def _similarity(q, k, METHOD: tl.constexpr):
    """phi(q, k)."""
    if METHOD == 0:
        d = q - k
        s = -(d * d)
    elif METHOD == 1:
        s = q * k
    else:
        s = -tl.abs(q - k)
    return s


@triton.jit
def _similarity_grads(q, k, METHOD: tl.constexpr):
    """(d phi / d q, d phi / d k), as torch's (sign(NaN) is NaN)."""
    if METHOD == 0:
        d = 2.0 * (q - k)
        dq = -d
        dk = d
    elif METHOD == 1:
        dq = k
        dk = q
    else:
        x = q - k
        s = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0))
        dq = -s
        dk = s
    return dq, dk


# The map sizes are not specialized on (Triton would on a multiple of 16): a
# 16-divisible width makes the output positions' loads 4-wide vectors, 4
# positions a thread in the [channels, positions] tiles but 1 in the
# position vectors, and every offset then converts between the two layouts
# through shared memory (and spilled on sm_80). Unspecialized, a thread
# holds one position and all of its BLOCK_M channels (the window's loads
# are shifted by each offset and could not be vectors anyway). The input-
# centric kernel's nchunks stays specialized (1: one channel block, 56
# registers instead of 79-95).
_SIZES = ('G', 'm', 'H', 'W', 'Ho', 'Wo')


@triton.jit(do_not_specialize=_SIZES)
def lr_fwd_kernel(q_ptr, k_ptr, v_ptr, prior_ptr, out_ptr, lse_ptr, go_ptr,
                  dsum_ptr, G, m, H, W, Ho, Wo, K: tl.constexpr, STRIDE: tl.constexpr,
                  METHOD: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_P: tl.constexpr, ACC: tl.constexpr,
                  RECOMPUTE: tl.constexpr):
    block = tl.program_id(0)
    pair = tl.program_id(1)  # sample * G + group
    chunk = tl.program_id(2)  # the group's channels [chunk * BLOCK_M, ...)
    g = pair % G
    P = Ho * Wo
    HW = H * W
    offs = block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    pair64 = pair.to(tl.int64)
    q = tl.load(q_ptr + pair64 * P + offs, mask=mask, other=0.0).to(ACC)
    # each window's top-left input position (outside the map for border
    # windows: every load at an offset outside is masked)
    ii0 = (offs // Wo) * STRIDE - K // 2
    jj0 = (offs % Wo) * STRIDE - K // 2
    x0 = ii0 * W + jj0
    k_row = k_ptr + pair64 * HW
    prior_row = prior_ptr + g * (K * K)
    if RECOMPUTE:  # the weights' sum is 1 from exp(logit - lse)
        peak = tl.load(lse_ptr + pair64 * P + offs, mask=mask,
                       other=0.0).to(ACC)
    else:  # sweep 1: each position's largest logit (NaN kept)
        peak = tl.full([BLOCK_P], float('-inf'), ACC)
        for di in range(K):
            ii = ii0 + di
            row_in = mask & (ii >= 0) & (ii < H)
            x_r = x0 + di * W
            p_r = prior_row + di * K
            for dj in range(K):
                jj = jj0 + dj
                inside = row_in & (jj >= 0) & (jj < W)
                kv = tl.load(k_row + (x_r + dj), mask=inside,
                             other=0.0).to(ACC)
                logit = (_similarity(q, kv, METHOD) +
                         tl.load(p_r + dj).to(ACC))
                peak = tl.maximum(peak,
                                  tl.where(inside, logit, float('-inf')),
                                  propagate_nan=tl.PropagateNan.ALL)
    # sweep 2: the weights' sum and the weighted values
    chans = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (pair64 * m + chans)[:, None]
    cmask = (chans < m)[:, None]
    v_rows = v_ptr + rows * HW
    total = tl.zeros([BLOCK_P], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for di in range(K):
        ii = ii0 + di
        row_in = mask & (ii >= 0) & (ii < H)
        x_r = x0 + di * W
        p_r = prior_row + di * K
        for dj in range(K):
            jj = jj0 + dj
            inside = row_in & (jj >= 0) & (jj < W)
            x = x_r + dj
            kv = tl.load(k_row + x, mask=inside, other=0.0).to(ACC)
            logit = _similarity(q, kv, METHOD) + tl.load(p_r + dj).to(ACC)
            w = tl.where(inside, tl.exp(logit - peak), 0.0)
            total += w
            v = tl.load(v_rows + x[None, :], mask=cmask & inside[None, :],
                        other=0.0).to(ACC)
            acc += w[None, :] * v
    if RECOMPUTE:
        out = acc
        # D's part from the block's channels: dsum[chunk, pair, position]
        go = tl.load(go_ptr + rows * P + offs[None, :],
                     mask=cmask & mask[None, :], other=0.0).to(ACC)
        tl.store(dsum_ptr + (chunk * tl.num_programs(1) + pair64) * P + offs,
                 tl.sum(go * out, 0), mask=mask)
    else:
        out = acc / total[None, :]
    tl.store(out_ptr + rows * P + offs[None, :],
             out.to(out_ptr.dtype.element_ty), mask=cmask & mask[None, :])
    if chunk == 0 and not RECOMPUTE:
        tl.store(lse_ptr + pair64 * P + offs,
                 (peak + tl.log(total)).to(lse_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def lr_bwd_query_kernel(go_ptr, q_ptr, k_ptr, v_ptr, prior_ptr, lse_ptr,
                        dsum_ptr, gq_ptr, part_ptr, G, m, H, W, Ho, Wo,
                        K: tl.constexpr, STRIDE: tl.constexpr,
                        METHOD: tl.constexpr, BLOCK_M: tl.constexpr,
                        ONE_CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                        ACC: tl.constexpr):
    """The query's gradient at BLOCK_P output positions, and the program's
    partial sums of the prior's, part[pair, block, offset]."""
    block = tl.program_id(0)
    pair = tl.program_id(1)
    nblocks = tl.num_programs(0)
    g = pair % G
    P = Ho * Wo
    HW = H * W
    offs = block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    pair64 = pair.to(tl.int64)
    q = tl.load(q_ptr + pair64 * P + offs, mask=mask, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + pair64 * P + offs, mask=mask, other=0.0).to(ACC)
    d_total = tl.load(dsum_ptr + pair64 * P + offs, mask=mask,
                      other=0.0).to(ACC)
    ii0 = (offs // Wo) * STRIDE - K // 2
    jj0 = (offs % Wo) * STRIDE - K // 2
    x0 = ii0 * W + jj0
    k_row = k_ptr + pair64 * HW
    prior_row = prior_ptr + g * (K * K)
    part_row = part_ptr + (pair64 * nblocks + block) * (K * K)
    lanes = tl.arange(0, BLOCK_M)
    go_group = go_ptr + pair64 * m * P  # the group's first channel
    v_group = v_ptr + pair64 * m * HW
    if ONE_CHUNK:  # the group's dout, read once
        rows = (pair64 * m + lanes)[:, None]
        cmask = (lanes < m)[:, None]
        go = tl.load(go_ptr + rows * P + offs[None, :],
                     mask=cmask & mask[None, :], other=0.0).to(ACC)
        v_rows = v_ptr + rows * HW
    grad_q = tl.zeros([BLOCK_P], dtype=ACC)
    for di in range(K):
        ii = ii0 + di
        row_in = mask & (ii >= 0) & (ii < H)
        x_r = x0 + di * W
        p_r = prior_row + di * K
        part_r = part_row + di * K
        for dj in range(K):
            jj = jj0 + dj
            inside = row_in & (jj >= 0) & (jj < W)
            x = x_r + dj
            kv = tl.load(k_row + x, mask=inside, other=0.0).to(ACC)
            logit = _similarity(q, kv, METHOD) + tl.load(p_r + dj).to(ACC)
            w = tl.where(inside, tl.exp(logit - lse), 0.0)
            if ONE_CHUNK:
                v = tl.load(v_rows + x[None, :],
                            mask=cmask & inside[None, :], other=0.0).to(ACC)
                d_weight = tl.sum(go * v, 0)
            else:
                d_weight = tl.zeros([BLOCK_P], dtype=ACC)
                for first in range(0, m, BLOCK_M):
                    chans = (first + lanes)[:, None]
                    cmask_c = (chans < m) & inside[None, :]
                    go_c = tl.load(go_group + (chans * P + offs[None, :]),
                                   mask=cmask_c, other=0.0).to(ACC)
                    v_c = tl.load(v_group + (chans * HW + x[None, :]),
                                  mask=cmask_c, other=0.0).to(ACC)
                    d_weight += tl.sum(go_c * v_c, 0)
            d_logit = tl.where(inside, w * (d_weight - d_total), 0.0)
            dq, _ = _similarity_grads(q, kv, METHOD)
            grad_q += tl.where(inside, d_logit * dq, 0.0)
            tl.store(part_r + dj, tl.sum(d_logit, 0))
    tl.store(gq_ptr + pair64 * P + offs, grad_q.to(gq_ptr.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def lr_bwd_kv_kernel(go_ptr, q_ptr, k_ptr, v_ptr, prior_ptr, lse_ptr,
                     dsum_ptr, gk_ptr, gv_ptr, G, m, H, W, Ho, Wo, Hs, Ws,
                     nchunks, K: tl.constexpr, STRIDE: tl.constexpr,
                     METHOD: tl.constexpr, BLOCK_M: tl.constexpr,
                     ONE_CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                     ACC: tl.constexpr):
    """The value's and the key's gradients at BLOCK_P input positions x of
    the residue class (ri, rj) = x mod STRIDE: x = (ri + STRIDE a,
    rj + STRIDE c), a < Hs, c < Ws. Offset d feeds x from output position
    o = (x + K // 2 - d) / STRIDE: only the offsets di = ri + K // 2 (mod
    STRIDE) give an integral row, the first of them (di0) row
    a + (ri + K // 2) // STRIDE, each next one the row above (and so for
    the columns)."""
    block = tl.program_id(0)
    pair = tl.program_id(1)
    z = tl.program_id(2)  # residue class * nchunks + channel block
    cls = z // nchunks
    chunk = z % nchunks
    ri = cls // STRIDE
    rj = cls % STRIDE
    g = pair % G
    P = Ho * Wo
    HW = H * W
    R: tl.constexpr = K // 2
    offs = block * BLOCK_P + tl.arange(0, BLOCK_P)
    a = offs // Ws
    c = offs % Ws
    xi = ri + a * STRIDE
    xj = rj + c * STRIDE
    mask = (offs < Hs * Ws) & (xi < H) & (xj < W)
    x = xi * W + xj
    pair64 = pair.to(tl.int64)
    kv = tl.load(k_ptr + pair64 * HW + x, mask=mask, other=0.0).to(ACC)
    lanes = tl.arange(0, BLOCK_M)
    chans = chunk * BLOCK_M + lanes
    rows = (pair64 * m + chans)[:, None]
    cmask = (chans < m)[:, None]
    v = tl.load(v_ptr + rows * HW + x[None, :], mask=cmask & mask[None, :],
                other=0.0).to(ACC)
    q_row = q_ptr + pair64 * P
    lse_row = lse_ptr + pair64 * P
    dsum_row = dsum_ptr + pair64 * P
    go_rows = go_ptr + rows * P
    go_group = go_ptr + pair64 * m * P  # the group's first channel
    v_group = v_ptr + pair64 * m * HW
    prior_row = prior_ptr + g * (K * K)
    # the channels of dlogit's sum: the program's own (one block), or all of
    # them (channel block 0, the one writing the key's gradient) or none
    m_key = tl.where(chunk == 0, m, 0)
    di0 = (ri + R) % STRIDE
    dj0 = (rj + R) % STRIDE
    oi = a + (ri + R) // STRIDE  # the output row of offset di0
    oj0 = c + (rj + R) // STRIDE
    o_r = oi * Wo + oj0
    grad_v = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    grad_k = tl.zeros([BLOCK_P], dtype=ACC)
    for di in range(di0, K, STRIDE):
        row_ok = mask & (oi >= 0) & (oi < Ho)
        p_r = prior_row + di * K
        oj = oj0
        o = o_r
        for dj in range(dj0, K, STRIDE):
            valid = row_ok & (oj >= 0) & (oj < Wo)
            q = tl.load(q_row + o, mask=valid, other=0.0).to(ACC)
            lse = tl.load(lse_row + o, mask=valid, other=0.0).to(ACC)
            logit = _similarity(q, kv, METHOD) + tl.load(p_r + dj).to(ACC)
            w = tl.where(valid, tl.exp(logit - lse), 0.0)
            go = tl.load(go_rows + o[None, :], mask=cmask & valid[None, :],
                         other=0.0).to(ACC)
            grad_v += w[None, :] * go
            if ONE_CHUNK:
                d_weight = tl.sum(go * v, 0)
            else:
                d_weight = tl.zeros([BLOCK_P], dtype=ACC)
                for first in range(0, m_key, BLOCK_M):
                    chans_c = (first + lanes)[:, None]
                    cmask_c = (chans_c < m) & valid[None, :]
                    go_c = tl.load(go_group + (chans_c * P + o[None, :]),
                                   mask=cmask_c, other=0.0).to(ACC)
                    v_c = tl.load(v_group + (chans_c * HW + x[None, :]),
                                  mask=cmask_c, other=0.0).to(ACC)
                    d_weight += tl.sum(go_c * v_c, 0)
            d_total = tl.load(dsum_row + o, mask=valid, other=0.0).to(ACC)
            _, dk = _similarity_grads(q, kv, METHOD)
            grad_k += tl.where(valid, w * (d_weight - d_total) * dk, 0.0)
            oj -= 1
            o -= 1
        oi -= 1
        o_r -= Wo
    tl.store(gv_ptr + rows * HW + x[None, :],
             grad_v.to(gv_ptr.dtype.element_ty), mask=cmask & mask[None, :])
    tl.store(gk_ptr + pair64 * HW + x, grad_k.to(gk_ptr.dtype.element_ty),
             mask=mask & (chunk == 0))
