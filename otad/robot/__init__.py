"""`otad-robot` and `otadctl`: verified install into NEW, atomic NEW/CURRENT/OLD swap, self-test, rollback."""
