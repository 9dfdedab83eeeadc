"""TFRecord files and ``tf.train.Example`` records, without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little endian)
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

with ``masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8  (mod 2**32)`` and ``crc`` the
CRC-32C (Castagnoli) of ``x``. Both CRCs are checked on reading; a corrupt or truncated file
raises :class:`TFRecordError` naming the file and the byte offset of the bad record.

``tf.train.Example`` messages are decoded with protobuf (the ``richhf`` extra), using message classes
built on first use from a ``FileDescriptorProto`` with the field numbers of TensorFlow's
``tensorflow/core/example/{example,feature}.proto`` (in a private descriptor pool, so it does not
clash with TensorFlow's own classes if TensorFlow is installed).

Also here: :class:`TFRecordWriter` and :func:`encode_example`, to write fixtures.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from .._extras import require
from .format import DataError

__all__ = [
    "TFRecordError", "crc32c", "masked_crc32c", "iter_tfrecord", "read_record_at", "TFRecordWriter",
    "Example", "Features", "Feature", "BytesList", "FloatList", "Int64List",
    "encode_example", "decode_example", "DecodeError", "CRC32C_IMPLEMENTATION",
]

# --------------------------------------------------------------------------------------------
# CRC-32C
# --------------------------------------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF

try:  # maintained C implementation (google-crc32c on PyPI)
    import google_crc32c as _gcrc

    def crc32c(data: bytes) -> int:
        """CRC-32C (Castagnoli) of ``data``."""
        return _gcrc.value(bytes(data) if not isinstance(data, bytes) else data)

    CRC32C_IMPLEMENTATION = f"google-crc32c ({getattr(_gcrc, 'implementation', '?')})"
except ImportError:  # pragma: no cover - exercised only where google-crc32c is unavailable
    _TABLE: list[int] = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def crc32c(data: bytes) -> int:
        """CRC-32C (Castagnoli) of ``data`` (pure-python fallback: slow)."""
        crc = _U32
        table = _TABLE
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ _U32

    CRC32C_IMPLEMENTATION = 'pure python (slow; pip install "rahf[richhf]")'


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


class TFRecordError(DataError):
    """A corrupt or truncated TFRecord file. The message names the file and the byte offset."""

    def __init__(self, path: str | os.PathLike, offset: int, problem: str):
        self.path = str(path)
        self.offset = offset
        super().__init__(None, problem, f"{path} at byte {offset}")


_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def _read_one(f: BinaryIO, path, offset: int, file_size: int, check_crc: bool) -> bytes | None:
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise TFRecordError(path, offset, f"truncated record header ({len(header)} of {_HEADER.size} bytes)")
    length, len_crc = _HEADER.unpack(header)
    if check_crc and masked_crc32c(header[:8]) != len_crc:
        raise TFRecordError(path, offset, "corrupt record: length CRC mismatch")
    end = offset + _HEADER.size + length + _FOOTER.size
    if end > file_size:
        raise TFRecordError(path, offset, f"truncated record: needs {end - offset} bytes, file has {file_size - offset} left")
    data = f.read(length)
    footer = f.read(_FOOTER.size)
    if len(data) < length or len(footer) < _FOOTER.size:  # file shrank while reading
        raise TFRecordError(path, offset, "truncated record")
    if check_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
        raise TFRecordError(path, offset, "corrupt record: data CRC mismatch")
    return data


def iter_tfrecord(path: str | os.PathLike, check_crc: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte_offset, record_bytes)`` for each record of a TFRecord file (uncompressed)."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = _read_one(f, path, offset, file_size, check_crc)
            if data is None:
                return
            yield offset, data
            offset += _HEADER.size + len(data) + _FOOTER.size


def read_record_at(f: BinaryIO, offset: int, path: str | os.PathLike = "<tfrecord>", check_crc: bool = True) -> bytes:
    """Read the record starting at ``offset`` of an open TFRecord file."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(offset)
    data = _read_one(f, path, offset, size, check_crc)
    if data is None:
        raise TFRecordError(path, offset, "no record at this offset (end of file)")
    return data


class TFRecordWriter:
    """Write records to a TFRecord file (uncompressed). Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")

    def write(self, record: bytes) -> None:
        record = bytes(record)
        length = struct.pack("<Q", len(record))
        self._f.write(length)
        self._f.write(struct.pack("<I", masked_crc32c(length)))
        self._f.write(record)
        self._f.write(struct.pack("<I", masked_crc32c(record)))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# tf.train.Example, built from a FileDescriptorProto
# --------------------------------------------------------------------------------------------


_MESSAGES = ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")
_classes: dict[str, Any] = {}


def _build_example_classes() -> dict[str, Any]:
    require("google.protobuf", extra="richhf", purpose="reading RichHF-18K TFRecords")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.message import DecodeError

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="rahf/tensorflow_example.proto", package="tensorflow", syntax="proto3")

    def repeated(msg, name, ftype, packed):
        fld = msg.field.add(name=name, number=1, label=F.LABEL_REPEATED, type=ftype)
        if packed:
            fld.options.packed = True

    repeated(fdp.message_type.add(name="BytesList"), "value", F.TYPE_BYTES, False)
    repeated(fdp.message_type.add(name="FloatList"), "value", F.TYPE_FLOAT, True)
    repeated(fdp.message_type.add(name="Int64List"), "value", F.TYPE_INT64, True)

    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
            (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1):
        feature.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                          type_name=f".tensorflow.{type_name}", oneof_index=0)

    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".tensorflow.Feature")
    features.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                       type_name=".tensorflow.Features.FeatureEntry")

    example = fdp.message_type.add(name="Example")
    example.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                      type_name=".tensorflow.Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = getattr(message_factory, "GetMessageClass", None)
    if get is None:  # pragma: no cover - protobuf < 4.21
        factory = message_factory.MessageFactory(pool)
        get = factory.GetPrototype
    classes = {n: get(pool.FindMessageTypeByName(f"tensorflow.{n}")) for n in _MESSAGES}
    classes["DecodeError"] = DecodeError
    return classes


def _message(name: str):
    if not _classes:
        _classes.update(_build_example_classes())
    return _classes[name]


def __getattr__(name: str):
    """``Example``, ``Features``, ``Feature``, ``BytesList``, ``FloatList``, ``Int64List`` and
    protobuf's ``DecodeError``, built (and protobuf imported) on first access."""
    if name in _MESSAGES or name == "DecodeError":
        return _message(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_float(v) -> bool:
    return isinstance(v, float) or type(v).__name__.startswith("float")


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or type(v).__name__.startswith(("int", "uint"))


def _fill_feature(feat, value: Any, name: str) -> None:
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()  # numpy array or scalar
    if isinstance(value, (bytes, bytearray, str, float, int)) or _is_float(value) or _is_int(value):
        value = [value]
    value = list(value)
    if not value:
        return  # a Feature with no kind set
    if all(isinstance(v, (bytes, bytearray, str)) for v in value):
        feat.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value)
    elif all(_is_int(v) for v in value):
        feat.int64_list.value.extend(int(v) for v in value)
    elif all(_is_float(v) or _is_int(v) for v in value):
        feat.float_list.value.extend(float(v) for v in value)
    else:
        raise TypeError(f"feature {name!r}: cannot encode values {value!r:.80} (bytes/str, ints or floats)")


def encode_example(features: Mapping[str, Any]) -> bytes:
    """Serialize a ``tf.train.Example``.

    Each value may be ``bytes``/``str`` or a list of them (-> BytesList), an ``int`` or list of ints
    (-> Int64List), a ``float`` or list of numbers containing a float (-> FloatList), or a numpy
    array/scalar (by dtype). An empty list gives a Feature with no kind set.
    """
    ex = _message("Example")()
    for name, value in features.items():
        _fill_feature(ex.features.feature[name], value, name)
    return ex.SerializeToString(deterministic=True)


def decode_example(data: bytes, typed: bool = False) -> dict[str, Any]:
    """Parse a serialized ``tf.train.Example``.

    Returns ``{name: list_of_values}`` (``bytes``, ``float`` or ``int`` values); with
    ``typed=True`` returns ``{name: (kind, list_of_values)}`` where kind is ``"bytes_list"``,
    ``"float_list"``, ``"int64_list"`` or ``None`` (no kind set). Raises
    :class:`google.protobuf.message.DecodeError` on malformed data.
    """
    ex = _message("Example").FromString(data)
    out: dict[str, Any] = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        values = list(getattr(feat, kind).value) if kind else []
        out[name] = (kind, values) if typed else values
    return out
