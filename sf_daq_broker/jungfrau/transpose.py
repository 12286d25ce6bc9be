"""An 8 x 8 transpose of uint16 values in SIMD registers, for the quarter-turned geometry.

A quarter turn reads the raw frame across its rows; done value by value, the transpose costs
more than the conversion itself (measured ~0.8 values per nanosecond of CPU). numba has no
vector shuffles, so this is an LLVM intrinsic: eight 16-byte loads, three rounds of
interleaving ``shufflevector``s (the classic unpack-low/high network on 16-, 32- and 64-bit
lanes) and eight 16-byte stores, i.e. 64 values in ~40 instructions.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_LOW_HIGH = (
    ([0, 8, 1, 9, 2, 10, 3, 11], [4, 12, 5, 13, 6, 14, 7, 15]),  # 16-bit lanes
    ([0, 1, 8, 9, 2, 3, 10, 11], [4, 5, 12, 13, 6, 7, 14, 15]),  # 32-bit lanes
    ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]),  # 64-bit lanes
)


@intrinsic
def transpose8(
    typingctx: Any,
    src: Any,
    src_at: Any,
    src_row_step: Any,
    dst: Any,
    dst_at: Any,
    dst_row_step: Any,
) -> Any:
    """``dst[dst_at + j * dst_row_step + i] = src[src_at + i * src_row_step + j]`` for
    ``i, j < 8``: eight rows of eight contiguous uint16 values of ``src`` become eight rows
    of ``dst`` (1-D C-contiguous uint16 arrays; row steps in elements, may be negative).
    The caller guarantees that every index is inside its array."""
    signature = types.void(src, types.int64, types.int64, dst, types.int64, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        src_array, src_first, src_step, dst_array, dst_first, dst_step = args
        i16, i64 = ir.IntType(16), ir.IntType(64)
        vector = ir.VectorType(i16, 8)
        source = context.make_array(sig.args[0])(context, builder, src_array)
        target = context.make_array(sig.args[3])(context, builder, dst_array)
        source_data = builder.bitcast(source.data, i16.as_pointer())
        target_data = builder.bitcast(target.data, i16.as_pointer())

        def row_pointer(data: Any, first: Any, step: Any, row: int) -> Any:
            offset = builder.add(first, builder.mul(step, ir.Constant(i64, row)))
            return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())

        rows = [
            builder.load(row_pointer(source_data, src_first, src_step, r), align=2)
            for r in range(8)
        ]
        for stage, (low, high) in enumerate(_LOW_HIGH):
            # Pair row r with row r + 2**stage within each group of 2**(stage+1) rows.
            distance = 1 << stage
            mixed: list[Any] = [None] * 8
            for r in range(8):
                if r & distance:
                    continue
                a, b = rows[r], rows[r + distance]
                low_mask = ir.Constant(ir.VectorType(ir.IntType(32), 8), low)
                high_mask = ir.Constant(ir.VectorType(ir.IntType(32), 8), high)
                mixed[r] = builder.shuffle_vector(a, b, low_mask)
                mixed[r + distance] = builder.shuffle_vector(a, b, high_mask)
            rows = mixed
        # After the three rounds, row r holds source column bit-reverse(r).
        for r in range(8):
            column = int(f"{r:03b}"[::-1], 2)
            builder.store(rows[r], row_pointer(target_data, dst_first, dst_step, column), align=2)
        return context.get_dummy_value()

    return signature, codegen
