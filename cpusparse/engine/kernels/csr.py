"""The Numba kernels of cpusparse: masked CSR products and their gradients.

Private module. Every kernel takes raw arrays and writes into arrays it is given;
none validates its input, allocates its result or draws random numbers. The
validated public wrappers live in :mod:`cpusparse.engine.csr`; the LLVM
intrinsics that fix the order of the vector reductions live in
:mod:`cpusparse.engine.kernels.intrinsics`.

Conventions shared by every kernel
----------------------------------
- Activations are *feature-major*: ``x`` has shape ``(n_in, n_batch)`` and ``out``
  shape ``(n_out, n_batch)``, both C-contiguous, so one feature's values over the
  batch are contiguous and the inner loops run over the batch.
- A weight matrix of shape ``(n_out, n_in)`` is a canonical CSR pattern
  ``(indptr, indices)`` with values ``data`` aligned with ``indices``.
- An *active pattern* ``(a_indptr, a_indices, a_data, a_pos)`` is the sub-pattern
  selected by a mask; ``a_pos[c]`` is the position of active entry ``c`` in the
  stored arrays, so gradients can be written back aligned with the stored entries.
- Every floating-point reduction runs in one fixed order that does not depend on
  the number of threads: a dot product over the batch accumulates element ``b`` in
  lane ``b % 8`` in ascending ``b`` and combines the lanes as
  ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``; a sum over rows of the
  weight matrix runs over the rows in ascending order. No ``fastmath``.
- Tiling never changes an order. The products over the batch are elementwise in
  the batch index ``b``, so ``_make_init_tile`` holds a tile of the batch (8 vectors
  of 64 bytes: 128 float32 or 64 float64, then narrower vectors and a scalar loop
  for the rest) in registers and still applies, to every element, one multiply and
  one add per active entry in stored (forward) or ascending-row (input gradient)
  order. ``_dot4`` computes four ``_dot`` products sharing one operand, each in the
  order of ``_dot``. Results are therefore bit-identical for any tiling, any
  ``n_batch`` split and any thread count.
"""

from numba import njit, prange

from .intrinsics import TILE_VECS, _dot, _dot4, _dot8, _init_8z, _init_x, _init_y, _init_z

__all__: list[str] = []


@njit(cache=True, nogil=True, inline="always")
def _keeps_flat(k, j, entry_mask, use_entry_mask, col_mask, use_col_mask):
    # Whether stored entry k (in column j) of a kept row is active, as 0 or 1 without
    # branches (a mask that is not used is read at index 0).
    e = entry_mask[k if use_entry_mask else 0] | (not use_entry_mask)
    c = col_mask[j if use_col_mask else 0] | (not use_col_mask)
    return e & c


@njit(cache=True, nogil=True, parallel=True)
def active_counts(
    indptr,
    indices,
    entry_mask,
    use_entry_mask,
    row_mask,
    use_row_mask,
    col_mask,
    use_col_mask,
    a_indptr,
):
    """Row pointer of the stored entries kept by the masks; return their number.

    The first of two parallel passes of the active-pattern selection: each row's count
    of active entries, then their prefix sum into ``a_indptr``; the caller allocates the
    active arrays at their exact size and :func:`active_fill` writes them.
    """
    # NOTE: a_indptr has n_out + 1 slots.
    n_out = indptr.shape[0] - 1
    for o in prange(n_out):
        count = 0
        if not use_row_mask or row_mask[o]:
            for k in range(indptr[o], indptr[o + 1]):
                count += _keeps_flat(
                    k, indices[k], entry_mask, use_entry_mask, col_mask, use_col_mask
                )
        a_indptr[o + 1] = count
    a_indptr[0] = 0
    for o in range(n_out):
        a_indptr[o + 1] += a_indptr[o]
    return a_indptr[n_out]


@njit(cache=True, nogil=True, parallel=True)
def active_fill(
    indptr,
    indices,
    data,
    entry_mask,
    use_entry_mask,
    col_mask,
    use_col_mask,
    a_indptr,
    a_indices,
    a_data,
    a_pos,
):
    """Write the active entries of every row, in stored order, from :func:`active_counts`.

    Rows are independent, so the result does not depend on the number of threads.
    """
    # NOTE: a_indices, a_data, a_pos have a_indptr[-1] slots.
    n_out = indptr.shape[0] - 1
    for o in prange(n_out):
        c = a_indptr[o]
        end = a_indptr[o + 1]
        if c == end:
            continue  # dropped row, or no active entry
        # (A branch-free fill, writing every entry and advancing past kept ones, was
        # slower here: 2.0 against 1.5 ms for 1 M stored entries at density 0.1.)
        for k in range(indptr[o], indptr[o + 1]):
            j = indices[k]
            if _keeps_flat(k, j, entry_mask, use_entry_mask, col_mask, use_col_mask):
                a_indices[c] = j
                a_data[c] = data[k]
                a_pos[c] = k
                c += 1
                if c == end:
                    break  # the row's last active entry


@njit(cache=True, nogil=True, inline="always")
def _sum(u):
    # Fixed-order sum with the same lane structure as ``_dot``.
    zero = u.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    n = u.shape[0]
    n8 = n - n % 8
    for b in range(0, n8, 8):
        s0 += u[b]
        s1 += u[b + 1]
        s2 += u[b + 2]
        s3 += u[b + 3]
        s4 += u[b + 4]
        s5 += u[b + 5]
        s6 += u[b + 6]
        s7 += u[b + 7]
    t = n - n8
    if t > 0:
        s0 += u[n8]
    if t > 1:
        s1 += u[n8 + 1]
    if t > 2:
        s2 += u[n8 + 2]
    if t > 3:
        s3 += u[n8 + 3]
    if t > 4:
        s4 += u[n8 + 4]
    if t > 5:
        s5 += u[n8 + 5]
    if t > 6:
        s6 += u[n8 + 6]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, nogil=True, inline="always")
def _output_grad_row(dout, out, row_mask, use_row_mask, relu, dpre, dbias, o):
    # Row o of output_grad: dpre[o] and dbias[o].
    n_batch = dpre.shape[1]
    g = dpre[o]
    if use_row_mask and not row_mask[o]:
        for b in range(n_batch):
            g[b] = 0
        dbias[o] = 0
        return
    d = dout[o]
    if relu:
        y = out[o]
        for b in range(n_batch):
            g[b] = d[b] if y[b] > 0 else 0
    else:
        for b in range(n_batch):
            g[b] = d[b]
    dbias[o] = _sum(g)


@njit(cache=True, nogil=True, inline="always")
def _init_gather_row(mat, cols, vals, start, end, row, init, relu):
    """``row[b] = act(init + sum_k vals[k] * mat[cols[k], b])``, k ascending, every b."""
    # NOTE: mat C-contiguous with row.shape[0] columns.
    n = row.shape[0]
    z = 64 // row.itemsize
    b0 = 0
    while b0 + TILE_VECS * z <= n:
        _init_8z(mat, cols, vals, start, end, row, b0, init, relu)
        b0 += TILE_VECS * z
    while b0 + z <= n:
        _init_z(mat, cols, vals, start, end, row, b0, init, relu)
        b0 += z
    if b0 + z // 2 <= n:
        _init_y(mat, cols, vals, start, end, row, b0, init, relu)
        b0 += z // 2
    if b0 + z // 4 <= n:
        _init_x(mat, cols, vals, start, end, row, b0, init, relu)
        b0 += z // 4
    if b0 < n:
        for b in range(b0, n):
            row[b] = init
        for k in range(start, end):
            w = vals[k]
            src = mat[cols[k]]
            for b in range(b0, n):
                row[b] = row[b] + w * src[b]
        if relu:
            for b in range(b0, n):
                if row[b] < 0:
                    row[b] = 0


@njit(cache=True, nogil=True, parallel=True)
def spmm_forward(a_indptr, a_indices, a_data, x, bias, row_mask, use_row_mask, relu, out):
    """``out = act(W_active @ x + bias)``; rows dropped by ``row_mask`` are 0.

    Each output element is ``bias`` plus the row's active products in stored order;
    a tile of the output row over the batch stays in registers for the whole row,
    from the bias to the ReLU, and is stored once.
    """
    # NOTE: x (n_in, n_batch) and out (n_out, n_batch) C-contiguous, same dtype.
    n_out, n_batch = out.shape
    for o in prange(n_out):
        row = out[o]
        if use_row_mask and not row_mask[o]:
            for b in range(n_batch):
                row[b] = 0
            continue
        _init_gather_row(x, a_indices, a_data, a_indptr[o], a_indptr[o + 1], row, bias[o], relu)


@njit(cache=True, nogil=True, parallel=True)
def spmm_gather_t(t_indptr, t_rows, t_data, dpre, dx):
    """``dx = W_active.T @ dpre`` from the transposed (CSC) active pattern.

    ``dx[j]`` is the sum over the rows ``o`` of column ``j`` in ascending order of
    ``t_data[c] * dpre[o]``, starting from 0 (the order of ``W_active.T @ dpre``
    accumulated row by row); every ``dx`` row is written once, from registers.
    """
    # NOTE: (t_indptr, t_rows, t_data) from transpose_active; dx (n_in, n_batch).
    n_in = dx.shape[0]
    zero = dx.dtype.type(0)
    for j in prange(n_in):
        _init_gather_row(dpre, t_rows, t_data, t_indptr[j], t_indptr[j + 1], dx[j], zero, False)


@njit(cache=True, nogil=True)
def transpose_active(a_indptr, a_indices, a_data, t_indptr, t_rows, t_data):
    """The CSC form of an active pattern: rows ascending within each column."""
    # NOTE: t_indptr has n_in + 1 slots and is zero on entry; t_rows, t_data n_active.
    n_out = a_indptr.shape[0] - 1
    n_in = t_indptr.shape[0] - 1
    n_active = a_indptr[n_out]
    for c in range(n_active):
        t_indptr[a_indices[c] + 1] += 1
    for j in range(n_in):
        t_indptr[j + 1] += t_indptr[j]
    for o in range(n_out):
        for c in range(a_indptr[o], a_indptr[o + 1]):
            j = a_indices[c]
            d = t_indptr[j]
            t_rows[d] = o
            t_data[d] = a_data[c]
            t_indptr[j] = d + 1
    for j in range(n_in, 0, -1):
        t_indptr[j] = t_indptr[j - 1]
    t_indptr[0] = 0


@njit(cache=True, nogil=True, inline="always")
def _sddmm_row(a_indices, a_pos, x, g, k, end, dweight):
    # Entries k .. end - 1 of one row: dweight[a_pos[c]] = g . x[a_indices[c]].
    while k + 8 <= end:
        d0, d1, d2, d3, d4, d5, d6, d7 = _dot8(
            g,
            x[a_indices[k]],
            x[a_indices[k + 1]],
            x[a_indices[k + 2]],
            x[a_indices[k + 3]],
            x[a_indices[k + 4]],
            x[a_indices[k + 5]],
            x[a_indices[k + 6]],
            x[a_indices[k + 7]],
        )
        dweight[a_pos[k]] = d0
        dweight[a_pos[k + 1]] = d1
        dweight[a_pos[k + 2]] = d2
        dweight[a_pos[k + 3]] = d3
        dweight[a_pos[k + 4]] = d4
        dweight[a_pos[k + 5]] = d5
        dweight[a_pos[k + 6]] = d6
        dweight[a_pos[k + 7]] = d7
        k += 8
    while k + 4 <= end:
        d0, d1, d2, d3 = _dot4(
            g, x[a_indices[k]], x[a_indices[k + 1]], x[a_indices[k + 2]], x[a_indices[k + 3]]
        )
        dweight[a_pos[k]] = d0
        dweight[a_pos[k + 1]] = d1
        dweight[a_pos[k + 2]] = d2
        dweight[a_pos[k + 3]] = d3
        k += 4
    while k < end:
        # numba's stub types an intrinsic's call with its typingctx parameter too.
        dweight[a_pos[k]] = _dot(g, x[a_indices[k]])  # type: ignore[call-arg]
        k += 1


@njit(cache=True, nogil=True, parallel=True)
def output_grad_sddmm(
    dout, out, row_mask, use_row_mask, relu, a_indptr, a_indices, a_pos, x, dpre, dbias, dweight
):
    """:func:`output_grad` then :func:`sddmm`, fused row by row.

    Row ``o`` of ``dpre`` is computed and then, still in L1, dotted with the inputs
    of the row's active entries: one pass over ``dpre`` instead of two, with the
    same operations in the same order as the two kernels.
    """
    # NOTE: preconditions of output_grad and of sddmm.
    n_out = dpre.shape[0]
    for o in prange(n_out):
        _output_grad_row(dout, out, row_mask, use_row_mask, relu, dpre, dbias, o)
        _sddmm_row(a_indices, a_pos, x, dpre[o], a_indptr[o], a_indptr[o + 1], dweight)


@njit(cache=True, nogil=True)
def compact_indptr(indptr, keep, new_indptr):
    """Row pointer of the pattern that keeps the stored entries where ``keep``."""
    # NOTE: new_indptr has n_out + 1 slots.
    n_out = indptr.shape[0] - 1
    c = 0
    new_indptr[0] = 0
    for o in range(n_out):
        for k in range(indptr[o], indptr[o + 1]):
            if keep[k]:
                c += 1
        new_indptr[o + 1] = c
    return c


@njit(cache=True, nogil=True, parallel=True)
def gather_block(indptr, indices, data, rows, col_pos, block):
    """``block[r, col_pos[j]] = W[rows[r], j]`` for the stored entries of the kept rows.

    The kept rows and columns of a CSR weight as a dense block for BLAS; ``block`` is
    zero on entry (entries not stored stay 0) and ``col_pos[j]`` is -1 for a column
    that is not kept.
    """
    # NOTE: rows int (kr,), col_pos int (n_in,), block (kr, kc) C-contiguous, zeroed.
    for r in prange(rows.shape[0]):
        o = rows[r]
        out = block[r]
        for k in range(indptr[o], indptr[o + 1]):
            p = col_pos[indices[k]]
            if p >= 0:
                out[p] = data[k]


@njit(cache=True, nogil=True, parallel=True)
def scatter_block(indptr, indices, rows, col_pos, dblock, dweight):
    """``dweight[k] = dblock[r, col_pos[j]]`` for the stored entries of the kept rows.

    The inverse of :func:`gather_block` for the weight gradient; ``dweight`` is zero on
    entry (the entries of dropped rows and columns stay 0).
    """
    # NOTE: as gather_block; dweight (nnz,) zeroed.
    for r in prange(rows.shape[0]):
        o = rows[r]
        src = dblock[r]
        for k in range(indptr[o], indptr[o + 1]):
            p = col_pos[indices[k]]
            if p >= 0:
                dweight[k] = src[p]


@njit(cache=True, nogil=True, parallel=True)
def take_block(w, rows, cols, block):
    """``block[r, j] = w[rows[r], cols[j]]``: the kept block of a dense row-major weight.

    The fast case of :func:`gather_block`, for a layer whose stored rows are all full
    (``w`` is then the stored values viewed as ``(n_stored_rows, n_in)``); a row index
    of -1 (a row with nothing stored) gives a row of zeros.
    """
    # NOTE: w (n_rows, n_in), rows int (kr,) into w or -1, cols int (kc,), block (kr, kc).
    for r in prange(rows.shape[0]):
        dst = block[r]
        if rows[r] < 0:
            for j in range(cols.shape[0]):
                dst[j] = 0.0
            continue
        src = w[rows[r]]
        for j in range(cols.shape[0]):
            dst[j] = src[cols[j]]


@njit(cache=True, nogil=True, parallel=True)
def put_block(dblock, rows, cols, dw):
    """``dw[rows[r], cols[j]] = dblock[r, j]``: the inverse of :func:`take_block`.

    A row index of -1 (nothing stored) is skipped.
    """
    # NOTE: as take_block, the rows >= 0 distinct; dw (n_rows, n_in) zeroed.
    for r in prange(rows.shape[0]):
        if rows[r] < 0:
            continue
        src = dblock[r]
        dst = dw[rows[r]]
        for j in range(cols.shape[0]):
            dst[cols[j]] = src[j]
