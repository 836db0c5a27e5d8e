"""LLVM intrinsics for the kernels: fixed-order vector dot products and batch tiles.

Private module. Numba's ``@njit`` cannot express "accumulate in 8 lanes, then add
the lanes as a balanced tree" without ``fastmath`` (which would let LLVM reorder the
sums), so the few operations whose order matters are written as LLVM IR here, with
explicit vector types. :mod:`cpusparse.engine.kernels.csr` calls them from its
``@njit`` kernels.

- ``_dot(u, v)``: dot product; element ``b`` in lane ``b % 8``, ascending ``b``,
  lanes combined as ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``.
- ``_dot4``/``_dot8``: four or eight ``_dot`` products sharing one operand, each in
  the order of ``_dot`` (sharing only saves the loads of the shared operand).
- ``_init_8z``, ``_init_z``, ``_init_y``, ``_init_x``: gather tiles of 8 x 64, 64, 32
  and 16 bytes over the batch, held in registers from the initial value to the
  optional ReLU (see ``_make_init_tile``).
"""

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

__all__: list[str] = []

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
_init_8z = _make_init_tile(TILE_VECS, 64)
_init_z = _make_init_tile(1, 64)
_init_y = _make_init_tile(1, 32)
_init_x = _make_init_tile(1, 16)
