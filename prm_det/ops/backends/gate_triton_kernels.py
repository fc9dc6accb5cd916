"""The gate tail's Triton kernels (:mod:`prm_det.ops.gate_tail`), launched by
:mod:`.gate_triton`.

    moments_kernel   per (sample, channel) plane: mean and M2 (Chan's
                     merge of BLOCK_P-wide partials, one read)
    tail_fwd_kernel  y = act((c * scale + shift) * gate + identity) for a
                     (sample, group) and BLOCK_P positions, every channel
                     of the group in turn (the gate, or the sigmoid of its
                     logits, made once)
    tail_bwd_kernel  every gradient for the same tile: the map's and the
                     shortcut's written, the gate's summed over the
                     program's channels in registers, and per split of the
                     positions the partial sums of scale's and shift's
    gate_grad_kernel the gate's gradient: the channel splits' partials
                     added, through the sigmoid and the affine for logits

A (sample, group)'s channels may be split over programs too (grid axis 2):
where pairs and position splits alone leave SMs idle (CBAM's one gate for
every channel). Every cross-program sum is two-level, partials added in a
fixed order (no atomics: the same bits every run).

Maps are read in their own dtype and accumulated in ``ACC`` (float32, or
float64 for float64 maps); positions are addressed ``p * stride_p``, which
holds for contiguous and channels_last maps alike.
"""
import triton
import triton.language as tl


@triton.jit
def moments_kernel(c_ptr, mean_ptr, m2_ptr, C, P, s_b, s_c, s_p,
                   BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    plane = tl.program_id(0)
    base = (plane // C) * s_b + (plane % C) * s_c
    lanes = tl.arange(0, BLOCK_P)
    count = tl.zeros([BLOCK_P], dtype=ACC)
    mean = tl.zeros([BLOCK_P], dtype=ACC)
    m2 = tl.zeros([BLOCK_P], dtype=ACC)
    for start in range(0, P, BLOCK_P):  # a running mean and M2 per lane
        offs = start + lanes
        mask = offs < P
        x = tl.load(c_ptr + base + offs * s_p, mask=mask, other=0.0).to(ACC)
        count += tl.where(mask, 1.0, 0.0)
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    total = tl.sum(count, 0)
    plane_mean = tl.sum(mean * count, 0) / tl.maximum(total, 1.0)
    spread = mean - plane_mean
    plane_m2 = tl.sum(m2 + count * spread * spread, 0)
    tl.store(mean_ptr + plane, plane_mean)
    tl.store(m2_ptr + plane, plane_m2)


@triton.jit
def _gate_values(gate_ptr, affine_ptr, pair, offs, mask, P,
                 HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """The gate of (sample, group) ``pair`` at ``offs``, and its logits (the
    gate itself without an affine)."""
    raw = tl.load(gate_ptr + pair * P + offs, mask=mask, other=0.0).to(ACC)
    if HAS_AFFINE:
        a = tl.load(affine_ptr + pair * 2).to(ACC)
        d = tl.load(affine_ptr + pair * 2 + 1).to(ACC)
        g = tl.sigmoid(raw * a + d)
    else:
        g = raw
    return g, raw


@triton.jit
def _channel_range(cg, ch_chunk):
    """The channels of the group this program takes: axis 2 splits them
    (where the (sample, group) pairs and position splits alone would leave
    SMs idle: CBAM's one gate for all channels)."""
    first = tl.program_id(2) * ch_chunk
    return first, tl.minimum(first + ch_chunk, cg)


@triton.jit
def tail_fwd_kernel(c_ptr, id_ptr, scale_ptr, shift_ptr, gate_ptr, affine_ptr,
                    y_ptr, C, P, groups, cg, ch_chunk, s_b, s_c, s_p,
                    HAS_ID: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_AFFINE: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pair = tl.program_id(0)  # (sample, group); a channel each without gate
    b = pair // groups
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    if HAS_GATE:
        g, _ = _gate_values(gate_ptr, affine_ptr, pair, offs, mask, P,
                            HAS_AFFINE, ACC)
    first, last = _channel_range(cg, ch_chunk)
    for j in range(first, last):
        ch = (pair % groups) * cg + j
        ptrs = b * s_b + ch * s_c + offs * s_p
        x = tl.load(c_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        out = x * tl.load(scale_ptr + b * C + ch).to(ACC) + \
            tl.load(shift_ptr + b * C + ch).to(ACC)
        if HAS_GATE:
            out = out * g
        if HAS_ID:
            out += tl.load(id_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        if RELU:
            # a NaN stays NaN, as in torch.relu (maximum drops it)
            out = tl.maximum(out, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(y_ptr + ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tail_bwd_kernel(gy_ptr, c_ptr, y_ptr, scale_ptr, shift_ptr, gate_ptr,
                    affine_ptr, gc_ptr, masked_ptr, dgate_ptr, part_ptr, C, P,
                    groups, cg, ch_chunk, splits, s_b, s_c, s_p,
                    HAS_Y: tl.constexpr, WRITE_MASKED: tl.constexpr,
                    HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr,
                    BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """The map's gradients; per channel and split, the partial sums of
    scale's and shift's; per channel split, dL/dgate summed over its
    channels ([channel splits, pairs, P]: gate_grad_kernel adds them)."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    b = pair // groups
    offs = split * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    if HAS_GATE:
        g, _ = _gate_values(gate_ptr, affine_ptr, pair, offs, mask, P,
                            HAS_AFFINE, ACC)
        d_gate = tl.zeros([BLOCK_P], dtype=ACC)
    first, last = _channel_range(cg, ch_chunk)
    for j in range(first, last):
        ch = (pair % groups) * cg + j
        ptrs = b * s_b + ch * s_c + offs * s_p
        d = tl.load(gy_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        if HAS_Y:
            y = tl.load(y_ptr + ptrs, mask=mask, other=0.0).to(ACC)
            d = tl.where(y > 0.0, d, 0.0)
            if WRITE_MASKED:
                tl.store(masked_ptr + ptrs,
                         d.to(masked_ptr.dtype.element_ty), mask=mask)
        x = tl.load(c_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        s = tl.load(scale_ptr + b * C + ch).to(ACC)
        if HAS_GATE:
            t = tl.load(shift_ptr + b * C + ch).to(ACC)
            d_gate += d * tl.where(mask, x * s + t, 0.0)
            gx = d * g
        else:
            gx = d
        tl.store(gc_ptr + ptrs, (gx * s).to(gc_ptr.dtype.element_ty),
                 mask=mask)
        row = ((b * C + ch) * splits + split) * 2
        tl.store(part_ptr + row, tl.sum(gx * x, 0))
        tl.store(part_ptr + row + 1, tl.sum(gx, 0))
    if HAS_GATE:
        npairs = tl.num_programs(0)
        tl.store(dgate_ptr + (tl.program_id(2) * npairs + pair) * P + offs,
                 d_gate, mask=mask)


@triton.jit
def gate_grad_kernel(dgate_ptr, gate_ptr, affine_ptr, ggate_ptr,
                     part_affine_ptr, P, csplits, splits,
                     HAS_AFFINE: tl.constexpr, BLOCK_P: tl.constexpr,
                     ACC: tl.constexpr):
    """dL/dgate (the channel splits' partials added in order), through the
    sigmoid and the affine with gate_affine: dL/dlogits and, per split,
    the affine's partial sums."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    npairs = tl.num_programs(0)
    offs = split * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    d_gate = tl.zeros([BLOCK_P], dtype=ACC)
    for k in range(0, csplits):
        d_gate += tl.load(dgate_ptr + (k * npairs + pair) * P + offs,
                          mask=mask, other=0.0)
    if HAS_AFFINE:
        g, logits = _gate_values(gate_ptr, affine_ptr, pair, offs, mask, P,
                                 HAS_AFFINE, ACC)
        dz = tl.where(mask, d_gate * g * (1.0 - g), 0.0)
        a = tl.load(affine_ptr + pair * 2).to(ACC)
        tl.store(ggate_ptr + pair * P + offs,
                 (dz * a).to(ggate_ptr.dtype.element_ty), mask=mask)
        row = (pair * splits + split) * 2
        tl.store(part_affine_ptr + row, tl.sum(dz * logits, 0))
        tl.store(part_affine_ptr + row + 1, tl.sum(dz, 0))
    else:
        tl.store(ggate_ptr + pair * P + offs,
                 d_gate.to(ggate_ptr.dtype.element_ty), mask=mask)
