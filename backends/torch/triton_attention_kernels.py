"""The Triton kernels of `moec.cached_attention` (cache write, flash prefill, split-K flash decoding, combine), and
of `moec.rope_cached_attention`'s decode (the decode kernel with ROPE).

What each kernel computes, how they are launched and the launch tables are in `backends/torch/triton_attention.py`;
this module holds only the `@triton.jit` bodies, so the launch logic reads on its own.
"""

from __future__ import annotations

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import last_to_arrive, tl, triton, wait_for_producers

if _HAVE_TRITON:
    from backends.torch.triton_fp8 import fp8_codes
    from backends.torch.triton_norm import rope_rotate

    @triton.jit
    def _write_kernel(
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        pos_ptr,
        kv_heads,
        seq,
        max_seq,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_cb,
        stride_ch,
        stride_cm,
        k_scale,  # FP8 caches: the cache holds k / k_scale and v / v_scale as e4m3 codes
        v_scale,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        FP8_CACHE: tl.constexpr = False,
        EMULATE_FP8: tl.constexpr = False,  # interpreter only: see triton_fp8.fp8_codes
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        bh = tl.program_id(0)
        b = (bh // kv_heads).to(tl.int64)
        h = (bh % kv_heads).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        # pos + s < max_seq is the caller's promise; the mask keeps a broken promise from writing out of bounds.
        ok = ((offs_s < seq) & (pos + offs_s < max_seq))[:, None] & (offs_d < D)[None, :]
        dst = b * stride_cb + h * stride_ch + (pos + offs_s)[:, None] * stride_cm + offs_d[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_s[:, None] * stride_ks + offs_d[None, :], mask=ok)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :], mask=ok)
        if FP8_CACHE:
            k_out = fp8_codes(k.to(tl.float32), k_scale, EMULATE_FP8)
            v_out = fp8_codes(v.to(tl.float32), v_scale, EMULATE_FP8)
        else:
            k_out = k.to(kc_ptr.dtype.element_ty)
            v_out = v.to(vc_ptr.dtype.element_ty)
        tl.store(kc_ptr + dst, k_out, mask=ok)
        tl.store(vc_ptr + dst, v_out, mask=ok)

    @triton.jit
    def _attend_block(
        q,
        k_ptrs,
        v_ptrs,
        acc,
        m_i,
        l_i,
        offs_n,
        q_pos,
        hi,
        window,
        d_ok,
        scale_log2,
        MASKED: tl.constexpr,
        WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """One online-softmax step over a [BLOCK_N, D] key/value block (flash attention's inner loop). FP8 caches are
        read as their codes (exact in q's dtype): k's scale is folded into `scale_log2` by the caller, v's multiplies
        the normalized output once."""
        if MASKED:
            col_ok = offs_n < hi
            k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * scale_log2
        if MASKED:
            allowed = col_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if WINDOW:
                allowed &= offs_n[None, :] > q_pos[:, None] - window
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see no key of a masked block (rows past the window's edge): keep its state unchanged.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q.dtype)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        kc_ptr,
        vc_ptr,
        out_ptr,
        pos_ptr,
        seq,
        q_heads,
        window,
        scale_log2,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_cb,
        stride_ch,
        stride_cm,
        stride_ob,
        stride_os,
        stride_oh,
        v_scale,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // q_heads).to(tl.int64)
        h = (bh % q_heads).to(tl.int64)
        kvh = h // GROUP
        pos = tl.load(pos_ptr + b)
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_ok = offs_m < seq
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        q_pos = pos + offs_m
        first = pos + m0  # absolute position of the program's first and last real rows
        last = pos + tl.minimum(m0 + BLOCK_M, seq) - 1
        hi = last + 1  # keys past the last row's position are never visible (nor written, past pos + seq)
        full_hi = first + 1  # keys below this are visible to every row (causally)
        if WINDOW:
            lo = tl.maximum(first - window + 1, 0)
            full_lo = tl.maximum(last - window + 1, 0)
        else:
            lo = first * 0
            full_lo = first * 0
        offs_n0 = tl.arange(0, BLOCK_N)
        base = b * stride_cb + kvh * stride_ch + offs_d[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # Three ranges of BLOCK_N-slot blocks starting at lo: the window's leading edge (masked), the blocks every
        # row sees in full (no mask), the causal diagonal up to hi (masked).
        n_head = tl.cdiv(full_lo - lo, BLOCK_N)
        full_start = lo + n_head * BLOCK_N
        n_full = tl.maximum(full_hi - full_start, 0) // BLOCK_N
        tail_start = full_start + n_full * BLOCK_N
        for i in range(0, n_head):
            offs_n = lo + i * BLOCK_N + offs_n0
            ptrs = base + offs_n[:, None] * stride_cm
            acc, m_i, l_i = _attend_block(q, kc_ptr + ptrs, vc_ptr + ptrs, acc, m_i, l_i, offs_n, q_pos, hi, window,
                                          d_ok, scale_log2, True, WINDOW, PRECISION, DOT_F32)
        for i in range(0, n_full):
            offs_n = full_start + i * BLOCK_N + offs_n0
            ptrs = base + offs_n[:, None] * stride_cm
            acc, m_i, l_i = _attend_block(q, kc_ptr + ptrs, vc_ptr + ptrs, acc, m_i, l_i, offs_n, q_pos, hi, window,
                                          d_ok, scale_log2, False, WINDOW, PRECISION, DOT_F32)
        for start in range(tail_start, hi, BLOCK_N):
            offs_n = start + offs_n0
            ptrs = base + offs_n[:, None] * stride_cm
            acc, m_i, l_i = _attend_block(q, kc_ptr + ptrs, vc_ptr + ptrs, acc, m_i, l_i, offs_n, q_pos, hi, window,
                                          d_ok, scale_log2, True, WINDOW, PRECISION, DOT_F32)
        out = acc / l_i[:, None] * v_scale
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_ptr,  # the step's k/v [B, Hkv, 1, D]: written to slot pos_b and attended from registers
        v_ptr,
        kc_ptr,
        vc_ptr,
        pos_ptr,
        out_ptr,  # [B, 1, Hq, D] when SINGLE
        part_acc_ptr,  # [B, Hq, splits, D] float32 otherwise
        part_lse_ptr,  # [B, Hq, splits] float32 (log2 domain)
        window,
        scale_log2,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_cb,
        stride_ch,
        stride_cm,
        stride_ob,
        stride_oh,
        splits,
        k_scale,
        v_scale,
        cos_ptr,  # ROPE: the step's rotary rows cos/sin [B or 1, 1, D] (unread otherwise)
        sin_ptr,
        stride_rb,  # their batch stride (0: one row for every sequence)
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SINGLE: tl.constexpr,  # splits == 1: write the output here, no combine
        WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        FP8_CACHE: tl.constexpr = False,
        EMULATE_FP8: tl.constexpr = False,
        ROPE: tl.constexpr = False,  # q and the step's k are unrotated: rotate them here (moec.rope_cached_attention)
        COMBINE: tl.constexpr = False,  # not SINGLE: the last split to arrive merges the splits (no combine launch)
        SPLITS_P: tl.constexpr = 1,  # COMBINE: splits rounded up to a power of two
        GROUP_P: tl.constexpr = 1,  # COMBINE: GROUP rounded up to a power of two
        counter_ptr=None,  # COMBINE: [B, Hkv] int32 zeroed arrival counters (triton_support.arrival_counters)
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        kv_len = tl.load(pos_ptr + b) + 1
        if WINDOW:
            start = tl.maximum(kv_len - window, 0)
        else:
            start = kv_len * 0
        chunk = tl.cdiv(tl.cdiv(kv_len - start, splits), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        if lo >= kv_len:  # this sequence needs fewer splits
            return
        hi = tl.minimum(lo + chunk, kv_len)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if ROPE:
            # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after: a second load of the row just read, at
            # the partner offsets, then the rope kernel's arithmetic (rope_rotate), so q equals what it would store.
            partner_d = (offs_d + D // 2) % D
            first_half = offs_d < D // 2
            rotary_row = b * stride_rb + offs_d
            cos = tl.load(cos_ptr + rotary_row, mask=d_ok, other=0.0)
            sin = tl.load(sin_ptr + rotary_row, mask=d_ok, other=0.0)
            q_partner = tl.load(q_rows + partner_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            q_partner = q_partner.to(tl.float32)
            q = rope_rotate(q, tl.where(first_half[None, :], -q_partner, q_partner), cos[None, :], sin[None, :])
        # Every row sees every slot in [lo, hi): the causal bound is kv_len itself, the window's edge is start.
        q_pos = tl.zeros([BLOCK_G], dtype=tl.int64) + kv_len
        offs_n0 = tl.arange(0, BLOCK_N)
        base = b * stride_cb + kvh * stride_ch + offs_d[None, :]
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        # The split holding the newest slot writes the step's k/v there and attends it from registers (no separate
        # write launch, and no read of a slot this launch writes); every other slot comes from the cache.
        is_last = hi == kv_len
        loop_hi = tl.where(is_last, hi - 1, hi)
        for j in range(lo, loop_hi, BLOCK_N):
            offs_n = j + offs_n0
            ptrs = base + offs_n[:, None] * stride_cm
            acc, m_i, l_i = _attend_block(q, kc_ptr + ptrs, vc_ptr + ptrs, acc, m_i, l_i, offs_n, q_pos, loop_hi,
                                          window, d_ok, scale_log2, True, False, PRECISION, DOT_F32)
        if is_last:
            k_row = k_ptr + b * stride_kb + kvh * stride_kh
            k_new = tl.load(k_row + offs_d, mask=d_ok)
            if ROPE:  # rotated before it is written and attended, as the separate rope kernel would have stored it
                k_partner = tl.load(k_row + partner_d, mask=d_ok).to(tl.float32)
                k_new = rope_rotate(k_new, tl.where(first_half, -k_partner, k_partner), cos, sin)
            v_new = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + offs_d, mask=d_ok)
            if FP8_CACHE:
                k_new = fp8_codes(k_new.to(tl.float32), k_scale, EMULATE_FP8)
                v_new = fp8_codes(v_new.to(tl.float32), v_scale, EMULATE_FP8)
            else:
                k_new = k_new.to(kc_ptr.dtype.element_ty)
                v_new = v_new.to(vc_ptr.dtype.element_ty)
            slot = b * stride_cb + kvh * stride_ch + (kv_len - 1) * stride_cm + offs_d
            tl.store(kc_ptr + slot, k_new, mask=d_ok)
            tl.store(vc_ptr + slot, v_new, mask=d_ok)
            # Read back in q's dtype, as from the cache; products and sum in float32, as the tensor cores do.
            k_new = k_new.to(q.dtype).to(tl.float32)
            v_new = v_new.to(q.dtype).to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * scale_log2
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            p_new = p_new.to(q.dtype).to(tl.float32)
            acc = acc * alpha[:, None] + p_new[:, None] * v_new[None, :]
            m_i = m_new
        out = acc / l_i[:, None] * v_scale  # linear in v: the combine of scaled splits is the scaled combine
        mask = g_ok[:, None] & d_ok[None, :]
        if SINGLE:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            row = (b * GROUP * tl.num_programs(1) + heads) * splits + split
            tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], out, mask=mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_ok)
            if COMBINE:  # the kv group's last split to finish merges all of them (triton_support.last_to_arrive)
                used = tl.cdiv(kv_len - start, chunk)
                if last_to_arrive(counter_ptr + b * tl.num_programs(1) + kvh, used):
                    _merge_group_splits(part_acc_ptr, part_lse_ptr, b * GROUP * tl.num_programs(1) + kvh * GROUP,
                                        used, splits, out_ptr + b * stride_ob + kvh * GROUP * stride_oh, stride_oh,
                                        GROUP, GROUP_P, D, BLOCK_D, SPLITS_P)

    @triton.jit
    def _decode_combine_kernel(
        part_acc_ptr,
        part_lse_ptr,
        pos_ptr,
        out_ptr,
        q_heads,
        window,
        stride_ob,
        stride_oh,
        splits,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS_P: tl.constexpr,  # splits rounded up to a power of two (one tile of partial rows)
        WINDOW: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        bh = tl.program_id(0).to(tl.int64)
        b = bh // q_heads
        h = bh % q_heads
        kv_len = tl.load(pos_ptr + b) + 1
        if WINDOW:
            start = tl.maximum(kv_len - window, 0)
        else:
            start = kv_len * 0
        chunk = tl.cdiv(tl.cdiv(kv_len - start, splits), BLOCK_N) * BLOCK_N
        used = tl.cdiv(kv_len - start, chunk)  # the splits the decode kernel did not skip
        _merge_splits(part_acc_ptr, part_lse_ptr, bh, used, splits, out_ptr + b * stride_ob + h * stride_oh, D,
                      BLOCK_D, SPLITS_P)

    @triton.jit
    def _merge_splits(part_acc_ptr, part_lse_ptr, bh, used, splits, out_row, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      SPLITS_P: tl.constexpr):
        """out_row[:D] = the `used` splits' partial outputs of query row `bh` (= b * Hq + h), weighted by their
        log-sum-exps (the combine kernel's, one program per query row)."""
        offs_s = tl.arange(0, SPLITS_P)
        lse = tl.load(part_lse_ptr + bh * splits + offs_s, mask=offs_s < used, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, 0))
        weight = weight / tl.sum(weight, 0)
        offs_d = tl.arange(0, BLOCK_D)
        parts = tl.load(part_acc_ptr + (bh * splits + offs_s)[:, None] * D + offs_d[None, :],
                        mask=(offs_s < used)[:, None] & (offs_d < D)[None, :], other=0.0)
        out = tl.sum(parts * weight[:, None], 0)
        tl.store(out_row + offs_d, out.to(out_row.dtype.element_ty), mask=offs_d < D)

    @triton.jit
    def _merge_group_splits(part_acc_ptr, part_lse_ptr, first_row, used, splits, out_rows, stride_oh,
                            GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            SPLITS_P: tl.constexpr):
        """`_merge_splits` for the GROUP query rows first_row.. of one kv group at once (out_rows: the first's
        output row, stride_oh apart): every partial is loaded in one go, so the last split to arrive pays one round
        trip to L2, not one per head. Sums in another order than `_merge_splits`' (float32 rounding apart)."""
        offs_g = tl.arange(0, GROUP_P)
        g_ok = offs_g < GROUP
        offs_s = tl.arange(0, SPLITS_P)
        rows = (first_row + offs_g)[:, None] * splits + offs_s[None, :]  # [GROUP_P, SPLITS_P]
        ok = g_ok[:, None] & (offs_s < used)[None, :]
        # A padded head reads zeros (finite weights); a skipped split -inf (weight 0).
        lse = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
        lse = tl.where(g_ok[:, None], lse, 0.0)
        weight = tl.exp2(lse - tl.max(lse, 1)[:, None])
        weight = weight / tl.sum(weight, 1)[:, None]
        offs_d = tl.arange(0, BLOCK_D)
        flat = tl.reshape(rows, (GROUP_P * SPLITS_P,))
        flat_ok = tl.reshape(ok, (GROUP_P * SPLITS_P,))
        parts = tl.load(part_acc_ptr + flat[:, None] * D + offs_d[None, :],
                        mask=flat_ok[:, None] & (offs_d < D)[None, :], other=0.0, cache_modifier=".cg")
        weighted = parts * tl.reshape(weight, (GROUP_P * SPLITS_P,))[:, None]
        out = tl.sum(tl.reshape(weighted, (GROUP_P, SPLITS_P, BLOCK_D)), 1)
        tl.store(out_rows + offs_g[:, None] * stride_oh + offs_d[None, :], out.to(out_rows.dtype.element_ty),
                 mask=g_ok[:, None] & (offs_d < D)[None, :])
