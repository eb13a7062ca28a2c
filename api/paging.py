"""Paging through stored rows: a tenant's objects newest first, and a job's items in order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item

Row = TypeVar("Row")
ITEM_PAGE = 1000


def page(
    session: Session,
    model: type[Row],
    tenant: str,
    limit: int,
    after: str | None,
    where: Sequence[ColumnElement[bool]] = (),
    newest: bool = True,
) -> tuple[list[Row], bool]:
    """A page of the tenant's rows, newest first unless `newest` is false (ids sort by
    creation); `after` is the previous page's last id.

    Also says whether more rows follow.
    """
    column = model.id  # type: ignore[attr-defined]
    owner = model.tenant  # type: ignore[attr-defined]
    order = column.desc() if newest else column.asc()
    query = select(model).where(owner == tenant, *where).order_by(order).limit(limit + 1)
    if after:
        query = query.where(column < after if newest else column > after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def item_pages(job_id: str, statuses: Sequence[str]) -> Iterator[list[Item]]:
    """A job's items in these states, in index order, a page at a time (each its own session)."""
    last = -1
    while True:
        with session_scope() as session:
            page = session.scalars(
                select(Item)
                .where(Item.job_id == job_id, Item.index > last, Item.status.in_(statuses))
                .order_by(Item.index)
                .limit(ITEM_PAGE)
            ).all()
        if page:
            yield list(page)
        if len(page) < ITEM_PAGE:
            return
        last = page[-1].index
