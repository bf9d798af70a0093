"""Loss inputs and token id lists decoded from the SDK's protobuf or JSON, checked: finite
values, non-negative integer token ids, 1 or 2 dimensions, sparse (CSR) parts in range.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import numpy as np

from tinkerd.types import UserError
from tinkerd.wire import pb

_PB_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}
_JSON_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
# Inputs holding token ids; every other loss input is a real number per position.
_INT_INPUTS = {"target_tokens"}
# The most cells a sparse (CSR) input may expand to: CSR lets a tiny body claim a huge shape.
MAX_CSR_CELLS = 1 << 26
# Token ids are decoded into int64 arrays: a larger JSON integer is refused, not overflowed.
TOKEN_ID_LIMIT = 2**63


def _check_values(name: str, arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim not in (1, 2):
        raise UserError(f"{where}: expected 1 or 2 dimensions, got shape {list(arr.shape)}")
    if name in _INT_INPUTS:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise UserError(f"{where}: token ids must be integers")
        arr = arr.astype(np.int64)
        if arr.size and arr.min() < 0:
            raise UserError(f"{where}: negative token id {int(arr.min())}")
        return arr
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{where}: values must be finite (found NaN or inf)")
    return arr


def tensor_from_proto(t: pb.Tensor, name: str, where: str) -> np.ndarray:
    dtype = _PB_DTYPES.get(t.dtype)
    if dtype is None:
        raise UserError(f"{where}: unsupported dtype {t.dtype}")
    shape = [int(s) for s in t.shape]
    try:
        if t.WhichOneof("encoding") == "sparse_csr":
            csr = t.sparse_csr
            arr = _densify_csr(
                np.frombuffer(csr.values, dtype=dtype),
                np.frombuffer(csr.crow_indices, dtype="<i8"),
                np.frombuffer(csr.col_indices, dtype="<i8"),
                shape,
            )
        else:
            arr = np.frombuffer(t.dense, dtype=dtype)
            arr = arr.reshape(shape) if shape else arr
    except ValueError as e:
        raise UserError(f"{where}: bad tensor encoding: {e}") from None
    return _check_values(name, arr, where)


def tensor_from_json(value: Any, name: str, where: str) -> np.ndarray:
    """A loss input from JSON: a plain list (token ids for target_tokens, else numbers) or
    TensorData; checked (finite values, non-negative integer token ids)."""
    if isinstance(value, list):  # plain list, coerced by key as the SDK does
        coerced = _JSON_DTYPES["int64" if name in _INT_INPUTS else "float32"]
        return _check_values(name, _array(value, coerced, where), where)
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise UserError(f"{where}: expected TensorData {{data, dtype, shape}}")
    dtype = _JSON_DTYPES.get(value.get("dtype", "float32"))
    if dtype is None:
        raise UserError(f"{where}: dtype must be float32 or int64")
    data = _array(value["data"], dtype, where)
    shape = value.get("shape")
    try:
        if value.get("sparse_crow_indices") is not None:
            crow = _array(value["sparse_crow_indices"], np.dtype("<i8"), where)
            col = _array(value.get("sparse_col_indices") or [], np.dtype("<i8"), where)
            data = _densify_csr(data, crow, col, shape or [])
        elif shape:
            data = data.reshape(shape)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: bad tensor shape: {e}") from None
    return _check_values(name, data, where)


def _array(values: Any, dtype: np.dtype, where: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"{where}: expected a list of numbers") from None


def is_token_ids(values: Any) -> TypeGuard[list[int]]:
    """A non-empty list of token ids: integers in [0, 2**63)."""
    return (
        isinstance(values, list)
        and bool(values)
        and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < TOKEN_ID_LIMIT
            for v in values
        )
    )


def int_list(values: Any, where: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise UserError(f"{where}: expected a list of integers")
    if any(not -TOKEN_ID_LIMIT <= v < TOKEN_ID_LIMIT for v in values):
        raise UserError(f"{where}: integers must be below 2**63 in magnitude")
    return values


def _densify_csr(
    values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int]
) -> np.ndarray:
    """A dense 2-D array from CSR parts; absent cells are 0."""
    if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
        raise ValueError(f"CSR parts do not fit shape {shape}")
    if min(shape) < 0 or shape[0] * shape[1] > MAX_CSR_CELLS:
        raise ValueError(f"CSR shape {shape} is out of range (at most {MAX_CSR_CELLS} cells)")
    if len(values) and (col.min() < 0 or col.max() >= shape[1]):
        raise ValueError("CSR column index out of range")
    if crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0):
        raise ValueError("CSR row pointers are not monotone")
    dense = np.zeros(shape, dtype=values.dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(crow))
    dense[rows, col] = values
    return dense
