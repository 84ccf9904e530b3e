"""TensorProto <-> NumPy, the way TF Serving writes responses (typed repeated fields, not tensor_content)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.errors import invalid_argument

NUMPY_OF = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_HALF: np.float16,
    types_pb2.DT_INT8: np.int8,
    types_pb2.DT_INT16: np.int16,
    types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT64: np.int64,
    types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_UINT16: np.uint16,
    types_pb2.DT_UINT32: np.uint32,
    types_pb2.DT_UINT64: np.uint64,
    types_pb2.DT_BOOL: np.bool_,
    types_pb2.DT_STRING: np.object_,
}
DTYPE_OF = {np.dtype(v): k for k, v in NUMPY_OF.items() if k != types_pb2.DT_STRING}

# The names TensorFlow uses in its own messages ("Expects arg[0] to be string but float is provided").
_TF_NAMES = {
    types_pb2.DT_FLOAT: "float",
    types_pb2.DT_DOUBLE: "double",
    types_pb2.DT_HALF: "half",
    types_pb2.DT_STRING: "string",
    types_pb2.DT_BOOL: "bool",
}


def dtype_name(dtype: int) -> str:
    if dtype in _TF_NAMES:
        return _TF_NAMES[dtype]
    name = types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"type {dtype}"
    return name.removeprefix("DT_").lower()


def shape_of(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    return tuple(int(dim.size) for dim in proto.tensor_shape.dim)


def to_ndarray(proto: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
    """A request TensorProto (typed fields or tensor_content) as NumPy; strings become an object array of bytes."""
    try:
        if proto.dtype == types_pb2.DT_STRING:
            shape = shape_of(proto)
            values = list(proto.string_val)
            size = int(np.prod(shape)) if shape else 1
            if len(values) == 1 and size != 1:
                values = values * size  # a single value fills the tensor, as in TensorFlow
            array = np.empty(len(values), dtype=object)
            array[:] = values
            return array.reshape(shape)
        return tf.make_ndarray(proto)
    except Exception as error:  # noqa: BLE001 - any malformed proto is the client's error
        raise invalid_argument(f"tensor parsing error: {alias} ({error})") from error


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """Encode a NumPy result with typed repeated fields (float_val, int64_val, string_val, ...) like TF Serving."""
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto()
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(dim=[{"size": int(s)} for s in array.shape]))
    flat = array.ravel()
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat)
        return proto
    dtype = DTYPE_OF.get(array.dtype)
    if dtype is None:
        raise invalid_argument(f"cannot encode an output of NumPy dtype {array.dtype}")
    proto.dtype = dtype
    if dtype == types_pb2.DT_FLOAT:
        proto.float_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_DOUBLE:
        proto.double_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_INT64:
        proto.int64_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_UINT64:
        proto.uint64_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_UINT32:
        proto.uint32_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_BOOL:
        proto.bool_val.extend(flat.tolist())
    elif dtype == types_pb2.DT_HALF:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:  # int32, int16, int8, uint16, uint8 all travel in int_val
        proto.int_val.extend(flat.tolist())
    return proto
