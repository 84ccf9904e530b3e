"""Prediction logs on disk: the file names the model server writes and a reader for them.

A model whose `models.config` entry has a `logging_config` gets a share of its answered Predict and Classify
requests written, with their responses, as `tensorflow.serving.PredictionLog` records (TF Serving's format, the
one its warmup files use) to TFRecord files:

    <filename_prefix>-<UTC time the file was opened, 20261130T101500123456Z>-<pid>-<sequence, 00001>.tfrecord

(a prefix ending in '/' names a folder: the files in it start with the time). Names sort in the order the files
were written, across restarts and servers sharing a prefix. A file is rotated once it would pass the server's
--prediction_log_max_file_bytes. The newest file of a running server may end in a record being written; the
reader stops there, and at the torn last record a crashed server can leave, without an error.

    for entry in read_prediction_logs("logs/predictions/productlens"):   # a prefix, or a folder of log files
        entry.predict_log.request.inputs["image_bytes"].string_val[0]    # the image as the client sent it

Imports no server code (the drift monitor in components/ reads the logs through this module) and not TensorFlow's
runtime, only its protos; TFRecord framing and CRC32C are done here, so tf.data.TFRecordDataset reads the files
too.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import google_crc32c
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import prediction_log_pb2

log = logging.getLogger("serving.prediction_log_format")

LOG_FILE_SUFFIX = ".tfrecord"
_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"
# What follows the prefix: the time, the writing process and its file sequence number.
_NAME_REST = re.compile(r"(\d{8}T\d{12}Z)-(\d+)-(\d{5,})" + re.escape(LOG_FILE_SUFFIX))
_ANY_LOG_NAME = re.compile(r"(?:.*-)?" + _NAME_REST.pattern)  # a log file of any prefix
_CRC_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # record length, masked CRC32C of the length
_FOOTER = struct.Struct("<I")  # masked CRC32C of the data


class PredictionLogError(ValueError):
    """A prediction log file is corrupt (a CRC mismatch or an undecodable record before its end)."""


def split_prefix(filename_prefix: str | os.PathLike) -> tuple[Path, str]:
    """(folder, start of each file name): 'logs/productlens' -> (logs, 'productlens-'); 'logs/' -> (logs, '')."""
    folder, stem = os.path.split(os.fspath(filename_prefix))
    return Path(folder or "."), f"{stem}-" if stem else ""


def log_file_path(filename_prefix: str | os.PathLike, opened: datetime, pid: int, sequence: int) -> Path:
    """The file a server (process `pid`) opens as its `sequence`th for a prefix, at `opened` (UTC)."""
    folder, start = split_prefix(filename_prefix)
    return folder / f"{start}{opened.astimezone(UTC).strftime(_TIME_FORMAT)}-{pid}-{sequence:05d}{LOG_FILE_SUFFIX}"


def log_files(prefix_or_dir: str | os.PathLike) -> list[Path]:
    """The log files of a filename prefix, or every log file in a folder, in the order they were written."""
    path = Path(prefix_or_dir)
    if path.is_dir():
        folder, start = path, None
    else:
        folder, start = split_prefix(prefix_or_dir)
        if not folder.is_dir():
            return []
    opened: dict[Path, str] = {}
    for entry in folder.iterdir():
        name = entry.name
        if start is None:
            match = _ANY_LOG_NAME.fullmatch(name)
        else:
            match = _NAME_REST.fullmatch(name[len(start) :]) if name.startswith(start) else None
        if match is not None and entry.is_file():
            opened[entry] = match.group(1)
    return sorted(opened, key=lambda p: (opened[p], p.name))


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + _FOOTER.pack(_masked_crc(data))


def read_records(path: Path) -> Iterator[bytes]:
    """The records of one TFRecord file; a torn last record (being written, or a crash) ends it quietly."""
    with open(path, "rb") as file:
        offset = 0
        while True:
            header = file.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                log.debug("%s: torn record header at byte %d (the file is being written, or was cut off)", path, offset)
                return
            length, length_crc = _HEADER.unpack(header)
            if _masked_crc(header[:8]) != length_crc:
                raise PredictionLogError(f"{path}: corrupt record length at byte {offset} (CRC mismatch)")
            body = file.read(length + _FOOTER.size)
            if len(body) < length + _FOOTER.size:
                log.debug("%s: torn record at byte %d (the file is being written, or was cut off)", path, offset)
                return
            data = body[:length]
            if _masked_crc(data) != _FOOTER.unpack(body[length:])[0]:
                raise PredictionLogError(f"{path}: corrupt record at byte {offset} (CRC mismatch)")
            yield data
            offset += _HEADER.size + len(body)


def read_prediction_logs(prefix_or_dir: str | os.PathLike) -> Iterator[prediction_log_pb2.PredictionLog]:
    """Every PredictionLog the server wrote for a filename prefix (or into a folder), oldest file first."""
    for path in log_files(prefix_or_dir):
        for data in read_records(path):
            try:
                yield prediction_log_pb2.PredictionLog.FromString(data)
            except DecodeError as error:
                raise PredictionLogError(f"{path}: a record is not a PredictionLog: {error}") from error
