"""Storage: one database API over SQLite (embedded default) and PostgreSQL."""

from storage.database import Database, DatabaseConfig, SchemaError, Txn

__all__ = ["Database", "DatabaseConfig", "SchemaError", "Txn"]
