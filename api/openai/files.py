"""Files for the OpenAI-compatible API: rows in SQL, bytes in the file store, streamed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.openai.filestore import file_store
from gemma_batch.errors import FieldError, InvalidRequest, NotFound, PayloadTooLarge
from gemma_batch.settings import Settings
from gemma_batch.store.tables import File

COPY_BLOCK = 1 << 20
UPLOAD_PURPOSES = ("batch", "user_data")


def save_upload(
    session: Session,
    settings: Settings,
    upload: IO[bytes],
    filename: str,
    purpose: str,
    tenant: str,
) -> File:
    """Copy an upload into the file store block by block, then record it."""
    # batch_output files are the service's own (a batch's results): nobody uploads one.
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            [
                FieldError(
                    "purpose", f"'{purpose[:64]}' cannot be uploaded; use 'batch' or 'user_data'"
                )
            ]
        )
    blocks = iter(lambda: upload.read(COPY_BLOCK), b"")
    return save_blocks(session, settings, blocks, filename, purpose, tenant)


def save_blocks(
    session: Session,
    settings: Settings,
    blocks: Iterable[bytes],
    filename: str,
    purpose: str,
    tenant: str,
) -> File:
    """Record a file and write its contents (a failure leaves neither)."""
    record = File(tenant=tenant, purpose=purpose, filename=filename[-256:], bytes=0)
    session.add(record)
    session.flush()
    size = 0

    def counted() -> Iterator[bytes]:
        nonlocal size
        for block in blocks:
            size += len(block)
            # The limit is for what callers upload; results are as large as they are.
            if purpose in UPLOAD_PURPOSES and size > settings.max_file_bytes:
                raise PayloadTooLarge(f"the file is larger than {settings.max_file_bytes} bytes")
            if block:
                yield block

    try:
        file_store(settings).save(session, record.id, counted())
    except BaseException:
        session.rollback()
        raise
    record.bytes = size
    session.commit()
    return record


def get_file(session: Session, file_id: str, tenant: str) -> File:
    # Another tenant's file is answered exactly as a missing one.
    record = session.scalar(select(File).where(File.id == file_id, File.tenant == tenant))
    if record is None:
        raise NotFound(f"no file '{file_id}'", "file_id")
    return record


def list_files(
    session: Session, tenant: str, purpose: str | None, limit: int, after: str | None
) -> list[File]:
    query = select(File).where(File.tenant == tenant).order_by(File.id.desc()).limit(limit)
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        query = query.where(File.id < after)
    return list(session.scalars(query))


def delete_file(session: Session, settings: Settings, file_id: str, tenant: str) -> None:
    record = get_file(session, file_id, tenant)
    session.delete(record)
    session.commit()
    file_store(settings).delete(file_id)
