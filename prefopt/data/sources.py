"""Read raw rows from a local file or a Hub dataset, naming file and line (or row) in every error.

Local formats: JSON Lines (``.jsonl``, or ``.json`` with one object per line), a ``.json`` file
holding one array of objects (a common export), Parquet, and any of them compressed with gzip,
bz2 or xz (``.jsonl.gz``, ...). A directory, a missing path and an unreadable file are refused
by name. Anything else is read with ``datasets.load_dataset`` as a Hub id.

:func:`read_rows` yields each row or the :class:`DataError` that made it unreadable, so the
``bad_rows=skip`` policy can drop and count a broken line like any other bad row; a truncated
file ends with one such error.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

from prefopt.data.example import DataError
from prefopt.errors import is_offline_error, offline_error

COMPRESSED: dict[str, Callable[..., IO[bytes]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}
FORMATS = (".jsonl", ".json", ".parquet")
LOCAL_SUFFIXES = tuple(f + c for f in FORMATS for c in ("", *COMPRESSED))


class RawRow(NamedTuple):
    where: str  # "path line 6", "path item 3", "path row 17", "hub-id split train row 4"
    row: dict[str, Any] | None  # None when ``error`` is set
    error: DataError | None = None


def is_local(path: str) -> bool:
    """A path that exists, names a local format, or looks like a path (not ``owner/name``)."""
    looks_like_path = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    return os.path.exists(path) or path.endswith(LOCAL_SUFFIXES) or looks_like_path


def _split_suffix(path: str) -> tuple[str, str]:
    """(format suffix, compression suffix), e.g. ('.jsonl', '.gz')."""
    base, comp = (
        (path[: -len(c)], c) if (c := os.path.splitext(path)[1]) in COMPRESSED else (path, "")
    )
    return os.path.splitext(base)[1], comp


def check_local(path: str) -> tuple[str, str]:
    """Refuse a path that cannot be read as a data file, naming it and the reason."""
    if not os.path.exists(path):
        raise DataError(f"dataset file {path} does not exist", fix="check dataset.path / eval_path")
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith(LOCAL_SUFFIXES))[:5]
        hint = f"; it holds {inside}" if inside else ""
        raise DataError(
            f"{path} is a directory, not a data file{hint}",
            fix="point dataset.path at one .jsonl, .json or .parquet file",
        )
    fmt, comp = _split_suffix(path)
    if fmt not in FORMATS:
        raise DataError(
            f"{path}: unknown file format {fmt + comp or '(no suffix)'!r}",
            fix=f"use one of {LOCAL_SUFFIXES}",
        )
    return fmt, comp


def _open(path: str, comp: str) -> IO[bytes]:
    return COMPRESSED[comp](path, "rb") if comp else open(path, "rb")  # noqa: SIM115


def _decode(where: str, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        err = f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        return RawRow(where, None, DataError(err, fix="re-encode the file as UTF-8"))
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Invalid control character at"
        ends = "; the line ends early (truncated?)" if e.pos >= len(text.rstrip()) else ""
        err = f"{where}: invalid JSON ({msg} at column {e.pos + 1}{ends})"
        return RawRow(where, None, DataError(err))
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        return RawRow(where, None, DataError(f"{where}: unreadable JSON value ({e})"))
    return _as_object(where, row)


def _as_object(where: str, row: Any) -> RawRow:
    if not isinstance(row, dict):
        err = f"{where}: expected a JSON object, got {type(row).__name__}"
        return RawRow(where, None, DataError(err))
    return RawRow(where, row)


def _json_lines(path: str, f: IO[bytes]) -> Iterator[RawRow]:
    line_no = 0
    try:
        for line_no, raw in enumerate(f, start=1):  # noqa: B007 (read after the loop on errors)
            if raw.strip():
                yield _decode(f"{path} line {line_no}", raw)
    except (OSError, EOFError) as e:  # a damaged or truncated compressed stream
        yield RawRow(
            f"{path} line {line_no + 1}",
            None,
            DataError(f"{path} line {line_no + 1}: cannot read on ({e})"),
        )


def _json_array(path: str, text: str) -> Iterator[RawRow]:
    """Items of one top-level JSON array, decoded one by one so each error names its item and
    line, and a truncated array still yields the items before the damage."""
    decoder, pos, i = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        where = f"{path} item {i} (line {text.count(chr(10), 0, pos) + 1})"
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRow(
                where,
                None,
                DataError(
                    f"{where}: invalid JSON ({e.msg}); the array ends here (truncated file?)"
                ),
            )
            return
        yield _as_object(where, item)
        i += 1


def _parquet(path: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                yield RawRow(f"{path} row {row}", item)
                row += 1
    except (pa.ArrowException, OSError) as e:
        what = "not a readable parquet file" if row == 0 else f"unreadable from row {row} on"
        raise DataError(
            f"{path}: {what} ({type(e).__name__}: {e})",
            fix="re-export the file, or point dataset.path at a good copy",
        ) from e


def read_rows(path: str, split: str) -> Iterator[RawRow]:
    """Every row of the source, or the error that made it unreadable (see the module docstring).
    Errors that make the whole source unreadable (missing file, corrupt parquet) are raised."""
    if not is_local(path):
        yield from _hub_rows(path, split)
        return
    fmt, comp = check_local(path)
    if fmt == ".parquet":
        if comp:
            raise DataError(
                f"{path}: compressed parquet is not read",
                fix="parquet compresses internally; decompress the file",
            )
        yield from _parquet(path)
        return
    with _open(path, comp) as f:
        try:
            head = f.peek(64)[:64]
        except (OSError, EOFError) as e:  # not gzip/bz2/xz data after all
            raise DataError(f"{path}: cannot read it as {comp} ({e})") from e
        if fmt == ".json" and head.lstrip()[:1] == b"[":
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: invalid UTF-8 at byte {e.start}", fix="re-encode the file as UTF-8"
                ) from e
            yield from _json_array(path, text)
        else:
            yield from _json_lines(path, f)


def _hub_rows(path: str, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        data = datasets.load_dataset(path, split=split)
    except Exception as e:  # network, unknown id, unknown split: all say "cannot load this"
        if is_offline_error(e):  # not cached, and the Hub cannot be reached
            raise offline_error("dataset", path, "dataset") from e
        raise DataError(
            f"dataset.path={path}: not a local file, and the Hub dataset (split "
            f"{split!r}) cannot be loaded: {type(e).__name__}: {e}",
            fix="check the path, the Hub id and the split name",
        ) from e
    for i, row in enumerate(data):
        yield RawRow(f"{path} split {split} row {i}", row)


def iter_rows(path: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row); the first unreadable row raises its :class:`DataError`."""
    for r in read_rows(path, split):
        if r.error is not None:
            raise r.error
        yield r.where, r.row


def source_key(path: str, split: str) -> str:
    """Content hash of a local file (so an edited file is re-tokenized), else the Hub id."""
    if is_local(path) and os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return f"hub:{path}:{split}"
