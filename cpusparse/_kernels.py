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
- Tiling never changes an order. The products over the batch are elementwise in
  the batch index ``b``, so ``_make_row_tile`` holds a tile of the batch (8 vectors
  of 64 bytes: 128 float32 or 64 float64, then narrower vectors and a scalar loop
  for the rest) in registers and still applies, to every element, one multiply and
  one add per active entry in stored (forward) or ascending-row (input gradient)
  order. ``_dot4`` computes four ``_dot`` products sharing one operand, each in the
  order of ``_dot``. Results are therefore bit-identical for any tiling, any
  ``n_batch`` split and any thread count.
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


@njit(cache=True, nogil=True, parallel=True)
def output_grad(dout, out, row_mask, use_row_mask, relu, dpre, dbias):
    """Gradient at the pre-activation and the bias gradient.

    ``dpre = dout * [out > 0 if relu] * row_mask``; ``dbias`` is its fixed-order
    sum over the batch.
    """
    # NOTE: dout, out, dpre (n_out, n_batch) C-contiguous; dpre may be dout itself
    # when relu is False.
    n_out = dpre.shape[0]
    for o in prange(n_out):
        _output_grad_row(dout, out, row_mask, use_row_mask, relu, dpre, dbias, o)


def _dots_intrinsic(n_dots):
    """Build ``_dotN(u, v0, ..., v{N-1})``: ``N`` ``_dot`` products sharing ``u``.

    Each product keeps the order of ``_dot``; sharing only saves the loads of ``u``.
    """

    def typer(u, vs):
        if not (
            isinstance(u, types.Array)
            and u.ndim == 1
            and isinstance(u.dtype, types.Float)
            and all(isinstance(v, types.Array) and v.ndim == 1 and v.dtype == u.dtype for v in vs)
        ):
            return None
        return types.UniTuple(u.dtype, n_dots)(u, *vs), codegen

    def codegen(context, builder, signature, args):
        # NOTE: u and every v have unit stride and the same length.
        u_arr = context.make_array(signature.args[0])(context, builder, args[0])
        v_arrs = [
            context.make_array(signature.args[i + 1])(context, builder, args[i + 1])
            for i in range(n_dots)
        ]
        n = builder.extract_value(u_arr.shape, 0)
        intp = n.type
        fty = context.get_value_type(signature.args[0].dtype)
        vec = ir.VectorType(fty, LANES)
        lanes = ir.Constant(intp, LANES)
        zero = ir.Constant(vec, [ir.Constant(fty, 0.0)] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_dots)]
        n_blocks = builder.udiv(n, lanes)
        with cgutils.for_range(builder, n_blocks) as loop:
            offset = builder.mul(loop.index, lanes)
            pu = builder.bitcast(builder.gep(u_arr.data, [offset]), vec.as_pointer())
            uu = builder.load(pu, align=1)
            for v_arr, acc in zip(v_arrs, accs, strict=True):
                pv = builder.bitcast(builder.gep(v_arr.data, [offset]), vec.as_pointer())
                prod = builder.fmul(uu, builder.load(pv, align=1))
                builder.store(builder.fadd(builder.load(acc), prod), acc)
        start = builder.mul(n_blocks, lanes)
        with cgutils.for_range(builder, builder.sub(n, start)) as loop:
            b = builder.add(start, loop.index)
            ub = builder.load(builder.gep(u_arr.data, [b]))
            lane = builder.trunc(loop.index, ir.IntType(32))
            for v_arr, acc in zip(v_arrs, accs, strict=True):
                prod = builder.fmul(ub, builder.load(builder.gep(v_arr.data, [b])))
                a = builder.load(acc)
                a = builder.insert_element(
                    a, builder.fadd(builder.extract_element(a, lane), prod), lane
                )
                builder.store(a, acc)
        results = []
        for acc in accs:
            a = builder.load(acc)
            part = [
                builder.extract_element(a, ir.Constant(ir.IntType(32), i)) for i in range(LANES)
            ]
            while len(part) > 1:
                part = [builder.fadd(part[i], part[i + 1]) for i in range(0, len(part), 2)]
            results.append(part[0])
        return context.make_tuple(builder, signature.return_type, results)

    if n_dots == 4:

        @intrinsic
        def _dot4(typingctx, u, v0, v1, v2, v3):
            return typer(u, (v0, v1, v2, v3))

        return _dot4

    @intrinsic
    def _dot8(typingctx, u, v0, v1, v2, v3, v4, v5, v6, v7):
        return typer(u, (v0, v1, v2, v3, v4, v5, v6, v7))

    return _dot8


_dot4 = _dots_intrinsic(4)
_dot8 = _dots_intrinsic(8)


def _splat(builder, vec, value):
    v = builder.insert_element(
        ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0)
    )
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count)
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), mask)


def _tile_types_ok(mat, cols, vals, row):
    # Numba types of the tile intrinsics: a 2-D float matrix, integer columns, and
    # values and a 1-D row of the matrix's dtype.
    return (
        isinstance(mat, types.Array)
        and mat.ndim == 2
        and isinstance(row, types.Array)
        and row.ndim == 1
        and isinstance(vals, types.Array)
        and isinstance(cols, types.Array)
        and isinstance(cols.dtype, types.Integer)
        and isinstance(mat.dtype, types.Float)
        and row.dtype == mat.dtype
        and vals.dtype == mat.dtype
    )


def _make_row_tile(n_vec, vec_bytes, scatter):
    """Build a tile kernel over ``n_vec`` vectors of ``vec_bytes`` bytes.

    gather (``scatter=False``), ``_tile(mat, cols, vals, start, end, row, b0)``:
        ``row[t] += vals[k] * mat[cols[k], t]`` for k = start, ..., end - 1 in this
        order, the tile ``t = b0 .. b0 + T - 1`` of ``row`` held in registers.
    scatter (``scatter=True``), same arguments:
        ``mat[cols[k], t] += vals[k] * row[t]`` for k = start, ..., end - 1, the tile
        of ``row`` held in registers.

    ``T = n_vec * vec_bytes / itemsize`` elements. Each element sees one ``+=`` per
    ``k``, in ascending ``k``: a multiply then an add, never fused.
    """

    @intrinsic
    def _tile(typingctx, mat, cols, vals, start, end, row, b0):
        if not _tile_types_ok(mat, cols, vals, row):
            return None
        sig = types.void(mat, cols, vals, types.intp, types.intp, row, types.intp)

        def codegen(context, builder, signature, args):
            # NOTE: mat C-contiguous; row unit stride; b0 + T <= row and mat widths.
            mat_a = context.make_array(signature.args[0])(context, builder, args[0])
            cols_a = context.make_array(signature.args[1])(context, builder, args[1])
            vals_a = context.make_array(signature.args[2])(context, builder, args[2])
            row_a = context.make_array(signature.args[5])(context, builder, args[5])
            start, end, b0 = args[3], args[4], args[6]
            fty = context.get_value_type(signature.args[0].dtype)
            width = vec_bytes // context.get_abi_sizeof(fty)
            vec = ir.VectorType(fty, width)
            vptr = vec.as_pointer()
            intp = start.type
            n_cols = builder.extract_value(mat_a.shape, 1)
            offs = [ir.Constant(intp, t * width) for t in range(n_vec)]
            row_ptrs = [
                builder.bitcast(builder.gep(row_a.data, [builder.add(b0, off)]), vptr)
                for off in offs
            ]
            regs = [builder.load(p, align=1) for p in row_ptrs]
            if not scatter:
                regs = [cgutils.alloca_once_value(builder, r) for r in regs]
            with cgutils.for_range(builder, builder.sub(end, start)) as loop:
                k = builder.add(start, loop.index)
                j = builder.load(builder.gep(cols_a.data, [k]))
                j = context.cast(builder, j, signature.args[1].dtype, types.intp)
                w = _splat(builder, vec, builder.load(builder.gep(vals_a.data, [k])))
                base = builder.add(builder.mul(j, n_cols), b0)
                for off, reg in zip(offs, regs, strict=True):
                    p = builder.bitcast(builder.gep(mat_a.data, [builder.add(base, off)]), vptr)
                    if scatter:
                        builder.store(
                            builder.fadd(builder.load(p, align=1), builder.fmul(w, reg)),
                            p,
                            align=1,
                        )
                    else:
                        prod = builder.fmul(w, builder.load(p, align=1))
                        builder.store(builder.fadd(builder.load(reg), prod), reg)
            if not scatter:
                for p, reg in zip(row_ptrs, regs, strict=True):
                    builder.store(builder.load(reg), p, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return _tile


def _make_init_tile(n_vec, vec_bytes):
    """Build a gather tile that starts from a constant and may apply ReLU on the way out.

    ``_tile(mat, cols, vals, start, end, row, b0, init, relu)``: the tile
    ``t = b0 .. b0 + T - 1`` of ``row`` becomes ``act(init + sum_k vals[k] * mat[cols[k], t])``
    with the terms added in ascending ``k`` (one multiply then one add each, starting
    from ``init``) and ``act(v) = 0 if v < 0 else v`` when ``relu`` (so NaN and -0.0
    pass through), the identity otherwise. The same operations, in the same order, as
    writing ``init`` to the row, gathering into it, then clamping it; but the row is
    neither read nor written until the final store.
    """

    @intrinsic
    def _tile(typingctx, mat, cols, vals, start, end, row, b0, init, relu):
        if not _tile_types_ok(mat, cols, vals, row):
            return None
        sig = types.void(
            mat, cols, vals, types.intp, types.intp, row, types.intp, mat.dtype, types.boolean
        )

        def codegen(context, builder, signature, args):
            # NOTE: mat C-contiguous; row unit stride; b0 + T <= row and mat widths.
            mat_a = context.make_array(signature.args[0])(context, builder, args[0])
            cols_a = context.make_array(signature.args[1])(context, builder, args[1])
            vals_a = context.make_array(signature.args[2])(context, builder, args[2])
            row_a = context.make_array(signature.args[5])(context, builder, args[5])
            start, end, b0, init, relu = args[3], args[4], args[6], args[7], args[8]
            fty = context.get_value_type(signature.args[0].dtype)
            width = vec_bytes // context.get_abi_sizeof(fty)
            vec = ir.VectorType(fty, width)
            vptr = vec.as_pointer()
            intp = start.type
            n_cols = builder.extract_value(mat_a.shape, 1)
            offs = [ir.Constant(intp, t * width) for t in range(n_vec)]
            first = _splat(builder, vec, init)
            regs = [cgutils.alloca_once_value(builder, first) for _ in offs]
            with cgutils.for_range(builder, builder.sub(end, start)) as loop:
                k = builder.add(start, loop.index)
                j = builder.load(builder.gep(cols_a.data, [k]))
                j = context.cast(builder, j, signature.args[1].dtype, types.intp)
                w = _splat(builder, vec, builder.load(builder.gep(vals_a.data, [k])))
                base = builder.add(builder.mul(j, n_cols), b0)
                for off, reg in zip(offs, regs, strict=True):
                    p = builder.bitcast(builder.gep(mat_a.data, [builder.add(base, off)]), vptr)
                    prod = builder.fmul(w, builder.load(p, align=1))
                    builder.store(builder.fadd(builder.load(reg), prod), reg)
            zero = ir.Constant(vec, [ir.Constant(fty, 0.0)] * width)
            relu_bit = context.cast(builder, relu, types.boolean, types.boolean)
            for off, reg in zip(offs, regs, strict=True):
                value = builder.load(reg)
                clamped = builder.select(builder.fcmp_ordered("<", value, zero), zero, value)
                value = builder.select(relu_bit, clamped, value)
                p = builder.bitcast(builder.gep(row_a.data, [builder.add(b0, off)]), vptr)
                builder.store(value, p, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return _tile


# Tiles of 8 x 64 bytes (128 float32 or 64 float64 over the batch) stay in
# registers; narrower tiles cover the rest of the batch, then a scalar loop.
TILE_VECS = 8
_gather_8z = _make_row_tile(TILE_VECS, 64, scatter=False)
_gather_z = _make_row_tile(1, 64, scatter=False)
_gather_y = _make_row_tile(1, 32, scatter=False)
_gather_x = _make_row_tile(1, 16, scatter=False)
_scatter_8z = _make_row_tile(TILE_VECS, 64, scatter=True)
_scatter_z = _make_row_tile(1, 64, scatter=True)
_scatter_y = _make_row_tile(1, 32, scatter=True)
_scatter_x = _make_row_tile(1, 16, scatter=True)
_init_8z = _make_init_tile(TILE_VECS, 64)
_init_z = _make_init_tile(1, 64)
_init_y = _make_init_tile(1, 32)
_init_x = _make_init_tile(1, 16)


@njit(cache=True, nogil=True, inline="always")
def _gather_row(mat, cols, vals, start, end, row, b0):
    """``row[b] += vals[k] * mat[cols[k], b]`` for ``b >= b0``, k ascending."""
    # NOTE: mat C-contiguous with row.shape[0] columns.
    n = row.shape[0]
    z = 64 // row.itemsize
    while b0 + TILE_VECS * z <= n:
        _gather_8z(mat, cols, vals, start, end, row, b0)
        b0 += TILE_VECS * z
    while b0 + z <= n:
        _gather_z(mat, cols, vals, start, end, row, b0)
        b0 += z
    if b0 + z // 2 <= n:
        _gather_y(mat, cols, vals, start, end, row, b0)
        b0 += z // 2
    if b0 + z // 4 <= n:
        _gather_x(mat, cols, vals, start, end, row, b0)
        b0 += z // 4
    if b0 < n:
        for k in range(start, end):
            w = vals[k]
            src = mat[cols[k]]
            for b in range(b0, n):
                row[b] = row[b] + w * src[b]


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
    ``t_data[c] * dpre[o]``, starting from 0: the order of :func:`spmm_t`, so the
    result is bit-identical, but every ``dx`` row is written once from registers
    instead of being read and written once per active entry.
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
        dweight[a_pos[k]] = _dot(g, x[a_indices[k]])
        k += 1


@njit(cache=True, nogil=True, parallel=True)
def sddmm(a_indptr, a_indices, a_pos, x, dpre, dweight):
    """``dweight[a_pos[c]] = dpre[row(c)] . x[col(c)]`` for every active entry ``c``.

    Eight (then four) dot products at a time share the loads of ``dpre[row]``; each
    keeps the order of ``_dot``.
    """
    # NOTE: dweight has the stored length and is zero outside a_pos.
    n_out = a_indptr.shape[0] - 1
    for o in prange(n_out):
        _sddmm_row(a_indices, a_pos, x, dpre[o], a_indptr[o], a_indptr[o + 1], dweight)


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


@njit(cache=True, nogil=True, inline="always")
def _scatter_rows_tile(a_indptr, a_indices, a_data, dpre, b0, dx):
    # dx[:, tile] += W_active.T @ dpre[:, tile] for the tile starting at b0 (one
    # width step of the cascade), rows in ascending order; returns the next b0.
    n_out, n_batch = dpre.shape
    z = 64 // dpre.itemsize
    if b0 + TILE_VECS * z <= n_batch:
        for o in range(n_out):
            _scatter_8z(dx, a_indices, a_data, a_indptr[o], a_indptr[o + 1], dpre[o], b0)
        return b0 + TILE_VECS * z
    if b0 + z <= n_batch:
        for o in range(n_out):
            _scatter_z(dx, a_indices, a_data, a_indptr[o], a_indptr[o + 1], dpre[o], b0)
        return b0 + z
    if b0 + z // 2 <= n_batch:
        for o in range(n_out):
            _scatter_y(dx, a_indices, a_data, a_indptr[o], a_indptr[o + 1], dpre[o], b0)
        return b0 + z // 2
    if b0 + z // 4 <= n_batch:
        for o in range(n_out):
            _scatter_x(dx, a_indices, a_data, a_indptr[o], a_indptr[o + 1], dpre[o], b0)
        return b0 + z // 4
    for o in range(n_out):
        g = dpre[o]
        for k in range(a_indptr[o], a_indptr[o + 1]):
            w = a_data[k]
            r = dx[a_indices[k]]
            for b in range(b0, n_batch):
                r[b] = r[b] + w * g[b]
    return n_batch


@njit(cache=True, nogil=True, parallel=True)
def spmm_t(a_indptr, a_indices, a_data, dpre, dx):
    """``dx += W_active.T @ dpre``, in parallel over tiles of batch columns.

    Each element of ``dx`` sums its terms over the rows in ascending order; a tile
    of ``dpre[row]`` stays in registers while the row's entries are scattered.
    """
    # NOTE: dx (n_in, n_batch) zero on entry, dpre (n_out, n_batch) C-contiguous.
    n_batch = dpre.shape[1]
    tile = TILE_VECS * (64 // dpre.itemsize)
    n_full = n_batch // tile
    for c in prange(n_full + 1):
        b0 = c * tile
        if c < n_full:
            _scatter_rows_tile(a_indptr, a_indices, a_data, dpre, b0, dx)
        else:
            while b0 < n_batch:
                b0 = _scatter_rows_tile(a_indptr, a_indices, a_data, dpre, b0, dx)


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
