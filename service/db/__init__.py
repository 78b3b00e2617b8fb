"""The store: SQLModel tables (models), keyword-only operations (crud), engines and migrations."""
from trainguard.service.db.engine import init_db, make_engine

__all__ = ["init_db", "make_engine"]
