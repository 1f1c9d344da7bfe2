"""Where the lake lives: a local folder, or a prefix on S3-compatible object storage.

`location("s3://bucket/prefix")` is an `ObjectPath`: the part of `pathlib.Path`'s interface the lake
uses (joining, names, listing, whole-object reads and writes, removal), over `pyarrow.fs.S3FileSystem`.
`location("/abs/path")` or `location("file:///abs/path")` is a plain `Path`. Everything above this
module (the lake, manifests, chunks, the catalog) is written once against that common interface, and
the few operations that differ (writing a file whole, moving, removing a tree, reading Parquet) go
through the functions here.

Object storage has no rename and no partial objects: a PUT (or a completed multipart upload) makes
the whole object visible at once, so "write to a temporary name, then rename" becomes "upload the
finished file under its final name" (data/atomic.py). The endpoint and credentials come from the usual
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which pyarrow, boto3 and s3fs all read;
evoforge never writes them anywhere.
"""
from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Union
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEMES = ("s3", "s3a")


class StorageError(OSError):
    pass


_filesystems: dict[str, pafs.FileSystem] = {}
_filesystems_guard = threading.Lock()


def s3_filesystem() -> pafs.S3FileSystem:
    """One pyarrow S3 filesystem per process and endpoint, configured from the AWS variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    with _filesystems_guard:
        fs = _filesystems.get(endpoint)
        if fs is None:
            options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
            if endpoint:
                parsed = urlparse(endpoint)
                options.update(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")
            fs = _filesystems[endpoint] = pafs.S3FileSystem(**options)
        return fs


@dataclass(frozen=True)
class _Stat:
    st_size: int


class ObjectPath:
    """An object (or a common prefix, "folder") on S3: `s3://bucket/key`. Immutable and hashable like
    a Path; those returned by a listing remember what the listing said (no request per `is_file`)."""

    __slots__ = ("_path", "_info")

    def __init__(self, path: str, _info: pafs.FileInfo | None = None):
        self._path = path.strip("/")  # "bucket/key", pyarrow's form
        self._info = _info

    @classmethod
    def from_uri(cls, uri: str) -> "ObjectPath":
        parsed = urlparse(uri)
        if parsed.scheme not in S3_SCHEMES or not parsed.netloc:
            raise StorageError(f"{uri!r} is not an s3://bucket/prefix location")
        return cls(f"{parsed.netloc}/{parsed.path.strip('/')}")

    # -- the pure part: names and joins ----------------------------------------------------------
    @property
    def fs(self) -> pafs.S3FileSystem:
        return s3_filesystem()

    @property
    def bucket(self) -> str:
        return self._path.split("/", 1)[0]

    @property
    def key(self) -> str:
        return self._path.split("/", 1)[1] if "/" in self._path else ""

    @property
    def name(self) -> str:
        return PurePosixPath(self._path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self._path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self._path).suffix

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(str(PurePosixPath(self._path).parent))

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self._path).parts

    def __truediv__(self, other) -> "ObjectPath":
        return ObjectPath(f"{self._path}/{str(other).strip('/')}")

    def relative_to(self, other: "ObjectPath") -> PurePosixPath:
        return PurePosixPath(self._path).relative_to(PurePosixPath(other._path))

    def as_posix(self) -> str:
        return str(self)

    def resolve(self) -> "ObjectPath":
        return self

    def __str__(self) -> str:
        return f"s3://{self._path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other._path == self._path

    def __lt__(self, other: "ObjectPath") -> bool:
        return self._path < other._path

    def __hash__(self) -> int:
        return hash(("s3", self._path))

    # -- what the store holds --------------------------------------------------------------------
    def check_bucket(self) -> "ObjectPath":
        """One line, not a traceback, when the bucket is missing or these credentials cannot reach it."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        try:
            info = self.fs.get_file_info(self.bucket)
        except OSError as err:
            raise StorageError(f"{self}: cannot reach bucket {self.bucket!r} at {endpoint} "
                               f"({str(err).splitlines()[0][:200]}); check AWS_ENDPOINT_URL and the credentials") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self}: bucket {self.bucket!r} does not exist at {endpoint}; create it first")
        return self

    def info(self) -> pafs.FileInfo:
        return self._info if self._info is not None else self.fs.get_file_info(self._path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(str(self))
        return _Stat(info.size)

    def _listing(self, recursive: bool) -> list["ObjectPath"]:
        selector = pafs.FileSelector(self._path, recursive=recursive, allow_not_found=True)
        return [ObjectPath(info.path, info) for info in self.fs.get_file_info(selector)]

    def iterdir(self) -> Iterator["ObjectPath"]:
        return iter(sorted(self._listing(recursive=False)))

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """`*`-patterns segment by segment (`round=*/verify`, `*/part-*.parquet`), like Path.glob
        (no `**`: `rglob`). One level at a time, by prefix (a delimiter listing of each folder that
        matched so far; a literal segment is joined, not listed), so a pattern over a run's rounds never
        lists what lies below them: the tens of thousands of chunk parts of a stage at work, every
        version's parts."""
        segments = pattern.strip("/").split("/")
        if "**" in segments:
            raise ValueError(f"ObjectPath.glob({pattern!r}): use rglob for a recursive match")
        folders = [self]
        for depth, segment in enumerate(segments):
            last = depth == len(segments) - 1
            if not last and not _wildcard(segment):
                folders = [folder / segment for folder in folders]  # a prefix that is not there lists nothing
                continue
            folders = [path for folder in folders for path in folder._listing(recursive=False)
                       if fnmatch.fnmatchcase(path.name, segment) and (last or path.is_dir())]
        return iter(sorted(folders))

    def rglob(self, pattern: str) -> Iterator["ObjectPath"]:
        return iter(sorted(p for p in self._listing(recursive=True) if fnmatch.fnmatchcase(p.name, pattern)))

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self._path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as err:
            if "does not exist" in str(err) or "NoSuchKey" in str(err):
                raise FileNotFoundError(str(self)) from None
            raise

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        """One PUT: the object appears whole or not at all."""
        with self.fs.open_output_stream(self._path) as stream:
            stream.write(data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        """The finished local file as this object, whole (multipart for large ones, completed last)."""
        pafs.copy_files(str(local), self._path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, local: Path) -> None:
        pafs.copy_files(self._path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def open_input(self):
        return self.fs.open_input_file(self._path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as err:
            if not (missing_ok and "does not exist" in str(err)):
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is under it."""


def _wildcard(segment: str) -> bool:
    return any(c in segment for c in "*?[")


LakePath = Union[Path, ObjectPath]


def location(where: str | os.PathLike) -> LakePath:
    """`s3://bucket/prefix` -> ObjectPath; `file:///abs`, or a plain path -> an absolute Path."""
    if isinstance(where, ObjectPath):
        return where
    text = str(where)
    scheme = urlparse(text).scheme
    if scheme in S3_SCHEMES:
        return ObjectPath.from_uri(text)
    if scheme == "file":
        return Path(urlparse(text).path).resolve()
    if "://" in text:
        raise StorageError(f"lake location {text!r}: evoforge reads s3://, file:// or a plain path")
    return Path(text).resolve()


def is_remote(path: LakePath) -> bool:
    return isinstance(path, ObjectPath)


# -- the operations that differ ------------------------------------------------------------------
def read_parquet(path: LakePath, data: bytes | None = None) -> pa.Table:
    if data is not None:
        return pq.read_table(pa.BufferReader(data))
    if isinstance(path, ObjectPath):  # fetched whole in one GET: a dataset read of the key asks 5 times
        return pq.read_table(pa.BufferReader(path.read_bytes()))
    return pq.read_table(path)


def parquet_metadata(path: LakePath) -> pq.FileMetaData:
    if isinstance(path, ObjectPath):
        with path.open_input() as handle:
            return pq.read_metadata(handle)
    return pq.read_metadata(path)


def parquet_schema(path: LakePath) -> pa.Schema:
    if isinstance(path, ObjectPath):
        with path.open_input() as handle:
            return pq.read_schema(handle)
    return pq.read_schema(path)


def write_parquet_object(table: pa.Table, path: ObjectPath) -> None:
    """A Parquet file written straight to its final key: visible only when the upload completes."""
    with path.fs.open_output_stream(path._path) as stream:
        pq.write_table(table, stream, compression="zstd")


def move(source: LakePath, target: LakePath) -> None:
    if isinstance(source, ObjectPath):
        source.fs.move(source._path, target._path)  # copy + delete: S3 has no rename
        return
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)


def remove_tree(path: LakePath) -> None:
    if isinstance(path, ObjectPath):
        try:
            path.fs.delete_dir(path._path)
        except (FileNotFoundError, OSError):
            pass
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def upload_tree(local: Path, target: LakePath) -> list[str]:
    """Copy the files of a local folder under `target` (an object prefix or a folder); returns their
    relative names. Not atomic by itself: callers commit with a manifest written last."""
    names = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    for name in names:
        if isinstance(target, ObjectPath):
            (target / name).upload(Path(local) / name)
        else:
            import shutil

            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(local) / name, target / name)
    return names


_clients: dict[str, object] = {}


def s3_client():
    """One boto3 S3 client per process and endpoint (the AWS variables, as for pyarrow): what pyarrow's
    filesystem cannot do, list and abort multipart uploads. Clients are thread-safe; sessions are not,
    so each client comes from a session of its own."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    with _filesystems_guard:
        client = _clients.get(endpoint)
        if client is None:
            client = _clients[endpoint] = boto3.session.Session().client("s3", endpoint_url=endpoint or None)
        return client


def unfinished_uploads(folder: ObjectPath) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload under `folder` that was started and neither completed
    nor aborted. pyarrow uploads every object it streams as a multipart upload, started when the
    stream opens: a writer killed mid-upload leaves no object (nothing a reader sees), but the store
    keeps the parts it received, and bills them, until the upload is aborted."""
    prefix = folder.key.rstrip("/") + "/"  # run r, not r2 as well
    found = []
    for page in s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=folder.bucket, Prefix=prefix):
        found += [(upload["Key"], upload["UploadId"]) for upload in page.get("Uploads", [])]
    return found


def abort_unfinished_uploads(folder: ObjectPath) -> int:
    """Abort what `unfinished_uploads` finds; returns the count. Only while no writer below `folder` is
    alive (the run's lock is held): a live writer's upload would fail at its close. Credentials that
    may not list or abort uploads leave them in place (one warning; a bucket lifecycle rule
    AbortIncompleteMultipartUpload then has to clear them) rather than fail the stage."""
    import logging

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        uploads = unfinished_uploads(folder)
        for key, upload_id in uploads:
            try:
                s3_client().abort_multipart_upload(Bucket=folder.bucket, Key=key, UploadId=upload_id)
            except ClientError as err:
                if (err.response.get("Error") or {}).get("Code") != "NoSuchUpload":  # completed or aborted meanwhile
                    raise
    except (BotoCoreError, ClientError) as err:
        logging.getLogger(__name__).warning("%s: could not abort the unfinished uploads of writers that died (%s)",
                                            folder, " ".join(str(err).split())[:200])
        return 0
    return len(uploads)


def duckdb_filesystem():
    """An fsspec S3 filesystem for DuckDB's `register_filesystem` (DuckDB 2.0 has no httpfs here),
    configured from the same AWS variables."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(endpoint_url=endpoint or None, skip_instance_cache=True)
