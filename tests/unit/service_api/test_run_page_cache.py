"""RunPageCache (GET /runs' serialised pages): versions, query keys, the byte bound, and no cache
on a store whose one connection every session shares. The store side (the version the triggers
bump, other processes' writes) is tests/integration/store/test_run_list_version.py."""
from __future__ import annotations

from types import SimpleNamespace

import sqlalchemy as sa

from trainguard.service.api.routes.runs import RunPageCache, _page_cache
from trainguard.service.db import make_engine

V1, V2 = ("epoch-a", 1), ("epoch-a", 2)
KEY = (100, 0, None)


def _cache(**kw) -> RunPageCache:
    return RunPageCache(sa.create_engine("sqlite://"), **kw)


def test_a_page_is_answered_only_under_the_version_it_was_built_under():
    c = _cache()
    assert c.get(V1, KEY) is None
    c.put(V1, KEY, b"one")
    assert c.get(V1, KEY) == b"one"
    assert c.get(V2, KEY) is None
    assert c.get(("epoch-b", 1), KEY) is None  # another store (rebuilt): the same number means nothing


def test_each_query_has_its_own_page():
    c = _cache()
    c.put(V1, (100, 0, None), b"all")
    c.put(V1, (100, 0, "running"), b"running")
    c.put(V1, (10, 5, None), b"ten")
    assert [c.get(V1, k) for k in [(100, 0, None), (100, 0, "running"), (10, 5, None), (10, 0, None)]] == [
        b"all", b"running", b"ten", None]


def test_a_new_version_drops_the_old_pages_and_a_late_older_page_is_not_kept():
    c = _cache()
    c.put(V1, KEY, b"old")
    c.put(V2, (1, 0, None), b"new")
    assert c.get(V1, KEY) is None and c.get(V2, (1, 0, None)) == b"new"
    c.put(V1, KEY, b"late")  # a request that read V1 before V2 was committed finishes last
    assert c.get(V2, (1, 0, None)) == b"new" and c.get(V1, KEY) is None
    c.put(("epoch-b", 0), KEY, b"rebuilt")  # another epoch always wins: versions do not compare across
    assert c.get(("epoch-b", 0), KEY) == b"rebuilt" and c.get(V2, (1, 0, None)) is None


def test_bodies_are_bounded_least_recently_used_first():
    c = _cache(max_bytes=10)
    c.put(V1, (1, 0, None), b"aaaa")
    c.put(V1, (2, 0, None), b"bbbb")
    assert c.get(V1, (1, 0, None)) == b"aaaa"  # now the most recently used
    c.put(V1, (3, 0, None), b"cccc")
    assert c.get(V1, (2, 0, None)) is None
    assert c.get(V1, (1, 0, None)) == b"aaaa" and c.get(V1, (3, 0, None)) == b"cccc"
    c.put(V1, (4, 0, None), b"x" * 11)  # over the bound by itself: not kept, nothing dropped
    assert c.get(V1, (4, 0, None)) is None and c.get(V1, (1, 0, None)) == b"aaaa"


def _request(engine) -> SimpleNamespace:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(engine=engine)))


def test_no_cache_on_a_store_whose_connection_every_session_shares(tmp_path):
    """In-memory SQLite: a reader there sees a writer's uncommitted rows, which a rollback undoes."""
    assert _page_cache(_request(make_engine("sqlite://"))) is None
    req = _request(make_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    cache = _page_cache(req)
    assert cache is not None and _page_cache(req) is cache
    req.app.state.engine = make_engine(f"sqlite:///{tmp_path / 'y.db'}")  # another store: another cache
    assert _page_cache(req) is not cache
