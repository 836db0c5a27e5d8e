"""All Numba code of cpusparse: masked CSR products and their gradients.

Private module. Every kernel takes raw arrays and writes into arrays it is given;
none validates its input, allocates its result or draws random numbers. The
validated public wrappers live in :mod:`cpusparse.sparse`.

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
"""

from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.core.extending import intrinsic

__all__: list[str] = []


@njit(cache=True, nogil=True)
def active_pattern(
    indptr,
    indices,
    data,
    entry_mask,
    use_entry_mask,
    row_mask,
    use_row_mask,
    col_mask,
    use_col_mask,
    a_indptr,
    a_indices,
    a_data,
    a_pos,
):
    """Compact the stored entries kept by the masks; return their number.

    One pass over the stored entries of the kept rows.
    """
    # NOTE: a_indptr has n_out + 1 slots; a_indices, a_data, a_pos have room for nnz.
    n_out = indptr.shape[0] - 1
    c = 0
    a_indptr[0] = 0
    for o in range(n_out):
        if use_row_mask and not row_mask[o]:
            a_indptr[o + 1] = c
            continue
        for k in range(indptr[o], indptr[o + 1]):
            if use_entry_mask and not entry_mask[k]:
                continue
            j = indices[k]
            if use_col_mask and not col_mask[j]:
                continue
            a_indices[c] = j
            a_data[c] = data[k]
            a_pos[c] = k
            c += 1
        a_indptr[o + 1] = c
    return c


@njit(cache=True, nogil=True, parallel=True)
def spmm_forward(a_indptr, a_indices, a_data, x, bias, row_mask, use_row_mask, relu, out):
    """``out = act(W_active @ x + bias)``; rows dropped by ``row_mask`` are 0.

    Each output element is ``bias`` plus the row's active products in stored order.
    """
    # NOTE: x (n_in, n_batch) and out (n_out, n_batch) C-contiguous, same dtype.
    n_out, n_batch = out.shape
    for o in prange(n_out):
        row = out[o]
        if use_row_mask and not row_mask[o]:
            for b in range(n_batch):
                row[b] = 0
            continue
        b0 = bias[o]
        for b in range(n_batch):
            row[b] = b0
        k = a_indptr[o]
        end = a_indptr[o + 1]
        # Four entries per sweep over the batch keep the output row in registers;
        # the additions still happen in stored order.
        while k + 4 <= end:
            w0 = a_data[k]
            w1 = a_data[k + 1]
            w2 = a_data[k + 2]
            w3 = a_data[k + 3]
            x0 = x[a_indices[k]]
            x1 = x[a_indices[k + 1]]
            x2 = x[a_indices[k + 2]]
            x3 = x[a_indices[k + 3]]
            for b in range(n_batch):
                r = row[b] + w0 * x0[b]
                r = r + w1 * x1[b]
                r = r + w2 * x2[b]
                row[b] = r + w3 * x3[b]
            k += 4
        while k < end:
            w0 = a_data[k]
            x0 = x[a_indices[k]]
            for b in range(n_batch):
                row[b] = row[b] + w0 * x0[b]
            k += 1
        if relu:
            for b in range(n_batch):
                if row[b] < 0:
                    row[b] = 0


LANES = 8


@intrinsic
def _dot(typingctx, u, v):
    """Fixed-order dot product of two 1-D arrays of the same dtype and length.

    Element ``b`` is accumulated in lane ``b % LANES`` of an explicit LLVM vector,
    in ascending ``b``; the lanes are then combined as a balanced tree. The vector
    type makes the order explicit, so LLVM vectorises it without ``fastmath`` and
    the result is the same on every x86 or ARM machine and for any thread count.
    """
    if not (
        isinstance(u, types.Array)
        and isinstance(v, types.Array)
        and u.ndim == 1
        and v.ndim == 1
        and u.dtype == v.dtype
        and isinstance(u.dtype, types.Float)
    ):
        return None
    sig = u.dtype(u, v)

    def codegen(context, builder, signature, args):
        # NOTE: u and v have unit stride and the same length (callers pass rows of
        # C-contiguous 2-D arrays).
        u_arr = context.make_array(signature.args[0])(context, builder, args[0])
        v_arr = context.make_array(signature.args[1])(context, builder, args[1])
        n = builder.extract_value(u_arr.shape, 0)
        intp = n.type
        fty = context.get_value_type(signature.args[0].dtype)
        vec = ir.VectorType(fty, LANES)
        lanes = ir.Constant(intp, LANES)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vec, [ir.Constant(fty, 0.0)] * LANES))
        n_blocks = builder.udiv(n, lanes)
        with cgutils.for_range(builder, n_blocks) as loop:
            offset = builder.mul(loop.index, lanes)
            pu = builder.bitcast(builder.gep(u_arr.data, [offset]), vec.as_pointer())
            pv = builder.bitcast(builder.gep(v_arr.data, [offset]), vec.as_pointer())
            prod = builder.fmul(builder.load(pu, align=1), builder.load(pv, align=1))
            builder.store(builder.fadd(builder.load(acc), prod), acc)
        start = builder.mul(n_blocks, lanes)
        with cgutils.for_range(builder, builder.sub(n, start)) as loop:
            b = builder.add(start, loop.index)
            prod = builder.fmul(
                builder.load(builder.gep(u_arr.data, [b])),
                builder.load(builder.gep(v_arr.data, [b])),
            )
            lane = builder.trunc(loop.index, ir.IntType(32))
            a = builder.load(acc)
            a = builder.insert_element(
                a, builder.fadd(builder.extract_element(a, lane), prod), lane
            )
            builder.store(a, acc)
        a = builder.load(acc)
        part = [builder.extract_element(a, ir.Constant(ir.IntType(32), i)) for i in range(LANES)]
        while len(part) > 1:
            part = [builder.fadd(part[i], part[i + 1]) for i in range(0, len(part), 2)]
        return part[0]

    return sig, codegen


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


@njit(cache=True, nogil=True, parallel=True)
def output_grad(dout, out, row_mask, use_row_mask, relu, dpre, dbias):
    """Gradient at the pre-activation and the bias gradient.

    ``dpre = dout * [out > 0 if relu] * row_mask``; ``dbias`` is its fixed-order
    sum over the batch.
    """
    # NOTE: dout, out, dpre (n_out, n_batch) C-contiguous; dpre may be dout itself
    # when relu is False.
    n_out, n_batch = dpre.shape
    for o in prange(n_out):
        g = dpre[o]
        if use_row_mask and not row_mask[o]:
            for b in range(n_batch):
                g[b] = 0
            dbias[o] = 0
            continue
        d = dout[o]
        if relu:
            y = out[o]
            for b in range(n_batch):
                g[b] = d[b] if y[b] > 0 else 0
        else:
            for b in range(n_batch):
                g[b] = d[b]
        dbias[o] = _sum(g)


@njit(cache=True, nogil=True)
def backward_fused(a_indptr, a_indices, a_data, a_pos, x, dpre, need_dx, dweight, dx):
    """Weight gradient at the active entries (SDDMM) and ``dx += W_active.T @ dpre``.

    One serial pass over the active entries, reading each input row once for both.
    """
    # NOTE: dweight has the stored length and is zero outside a_pos; dx is zero on
    # entry, shape (n_in, n_batch). Same results as sddmm + spmm_t, bit for bit.
    n_out = a_indptr.shape[0] - 1
    for o in range(n_out):
        g = dpre[o]
        for k in range(a_indptr[o], a_indptr[o + 1]):
            j = a_indices[k]
            dweight[a_pos[k]] = _dot(g, x[j])
            if need_dx:
                w = a_data[k]
                r = dx[j]
                for b in range(g.shape[0]):
                    r[b] = r[b] + w * g[b]


@njit(cache=True, nogil=True, parallel=True)
def sddmm(a_indptr, a_indices, a_pos, x, dpre, dweight):
    """``dweight[a_pos[c]] = dpre[row(c)] . x[col(c)]`` for every active entry ``c``."""
    # NOTE: dweight has the stored length and is zero outside a_pos.
    n_out = a_indptr.shape[0] - 1
    for o in prange(n_out):
        g = dpre[o]
        for k in range(a_indptr[o], a_indptr[o + 1]):
            dweight[a_pos[k]] = _dot(g, x[a_indices[k]])


@njit(cache=True, nogil=True, parallel=True)
def spmm_t(a_indptr, a_indices, a_data, dpre, chunk, dx):
    """``dx += W_active.T @ dpre``, in parallel over blocks of ``chunk`` batch columns.

    Each element of ``dx`` sums its terms over the rows in ascending order.
    """
    # NOTE: dx (n_in, n_batch) zero on entry; chunk >= 1.
    n_out, n_batch = dpre.shape
    n_chunks = (n_batch + chunk - 1) // chunk
    for c in prange(n_chunks):
        lo = c * chunk
        hi = min(lo + chunk, n_batch)
        for o in range(n_out):
            g = dpre[o, lo:hi]
            for k in range(a_indptr[o], a_indptr[o + 1]):
                w = a_data[k]
                r = dx[a_indices[k], lo:hi]
                for b in range(hi - lo):
                    r[b] = r[b] + w * g[b]


@njit(cache=True, nogil=True)
def scatter_rows(indptr, keep, new_indptr):
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
