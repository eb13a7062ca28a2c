"""Where /v1/files keeps file contents: somewhere every API process reaches.

`GEMMA_BATCH_FILES_URL` picks the place:
- `sql` (the default): in the database, as rows of one block each, so API processes on any
  number of machines share the files with nothing more to run;
- `s3://bucket/prefix`: S3 or any S3-compatible object store (MinIO, Ceph, R2), reached with
  boto3's own settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...);
- `file:`: the folder `GEMMA_BATCH_FILES_DIR`, for one machine only.

Contents go in and come out block by block, never whole in memory. Writes are all or nothing: a
failed upload leaves no partial contents behind.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Protocol

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import FileBlock

# What a read or a row holds at once: writers hand blocks of any size (a batch's output lines).
BLOCK = 1 << 20
# S3 takes a multipart upload's parts at 5 MiB or more (but the last); bigger parts, fewer calls.
S3_PART = 16 << 20


def even_blocks(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The same bytes in blocks of BLOCK (the last shorter)."""
    buffer = bytearray()
    for block in blocks:
        buffer += block
        while len(buffer) >= BLOCK:
            yield bytes(buffer[:BLOCK])
            del buffer[:BLOCK]
    if buffer:
        yield bytes(buffer)


class FileStore(Protocol):
    def save(self, session: Session, file_id: str, blocks: Iterable[bytes]) -> None:
        """Write the contents; on SQL, in `session`'s transaction, which the caller commits."""

    def blocks(self, file_id: str) -> Iterator[bytes]:
        """The contents, block by block (BLOCK bytes each but the last)."""

    def delete(self, file_id: str) -> None:
        """Remove the contents, once the file's record is gone."""


class SqlFiles:
    def save(self, session: Session, file_id: str, blocks: Iterable[bytes]) -> None:
        for seq, block in enumerate(even_blocks(blocks)):
            # A Core insert: the ORM would keep every block it added until the commit.
            session.execute(insert(FileBlock).values(file_id=file_id, seq=seq, data=block))

    def blocks(self, file_id: str) -> Iterator[bytes]:
        # One block per query, each in a short session: a download may take minutes.
        seq = 0
        while True:
            with session_scope() as session:
                block = session.scalar(
                    select(FileBlock.data).where(FileBlock.file_id == file_id, FileBlock.seq == seq)
                )
            if block is None:
                return
            yield block
            seq += 1

    def delete(self, file_id: str) -> None:
        pass  # the database removed the blocks with the record (ON DELETE CASCADE)


class FolderFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, session: Session, file_id: str, blocks: Iterable[bytes]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / file_id
        partial = target.with_suffix(".part")
        try:
            with partial.open("wb") as out:
                for block in blocks:
                    out.write(block)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def blocks(self, file_id: str) -> Iterator[bytes]:
        with (self.folder / file_id).open("rb") as source:
            yield from iter(lambda: source.read(BLOCK), b"")

    def delete(self, file_id: str) -> None:
        (self.folder / file_id).unlink(missing_ok=True)


class S3Files:
    def __init__(self, url: str) -> None:
        import boto3  # only a deployment that stores files in S3 needs it

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client: Any = boto3.client("s3")

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}/{file_id}" if self.prefix else file_id

    def save(self, session: Session, file_id: str, blocks: Iterable[bytes]) -> None:
        key = self._key(file_id)
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        parts: list[dict[str, Any]] = []
        buffer = bytearray()

        def flush() -> None:
            number = len(parts) + 1
            sent = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=bytes(buffer)
            )
            parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            buffer.clear()

        try:
            for block in blocks:
                buffer += block
                if len(buffer) >= S3_PART:
                    flush()
            if buffer or not parts:  # an empty file is one empty part
                flush()
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

    def blocks(self, file_id: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(file_id))["Body"]
        try:
            yield from body.iter_chunks(BLOCK)
        finally:
            body.close()

    def delete(self, file_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(file_id))


def file_store(settings: Settings) -> FileStore:
    return _store(settings.files_url, settings.files_dir)


@lru_cache(maxsize=4)
def _store(url: str, files_dir: Path) -> FileStore:  # one S3 client per process, not per call
    if url.startswith("s3://"):
        return S3Files(url)
    if url.startswith("file:"):
        folder = url.removeprefix("file:").removeprefix("//")
        return FolderFiles(Path(folder) if folder else files_dir)
    return SqlFiles()


class _BlockReader(io.RawIOBase):
    """A file object over an iterator of blocks, for readers that want lines."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks, self._rest = blocks, b""

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        # A reader that stops early lets go of what the store holds open (an S3 response).
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            self._rest = next(self._blocks, b"")
            if not self._rest:
                return 0
        size = min(len(buffer), len(self._rest))
        buffer[:size], self._rest = self._rest[:size], self._rest[size:]
        return size


def open_file(store: FileStore, file_id: str) -> IO[bytes]:
    """The contents as a buffered binary file (readline and all), streamed from the store."""
    return io.BufferedReader(_BlockReader(store.blocks(file_id)), buffer_size=1 << 20)
