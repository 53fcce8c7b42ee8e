"""SQLite helpers shared by the daemons' databases."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a connection in autocommit mode (isolation_level=None).

    On an error the transaction is rolled back, unless SQLite rolled it back itself (it
    does on an I/O error or a full disk): a ROLLBACK then fails with "cannot rollback - no
    transaction is active", and that error would replace the one that says what happened.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
