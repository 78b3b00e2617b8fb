"""What a submitted pipeline may touch: data files and a Hugging Face model folder
(`model.hf.path`) under the allowed data roots, checkpoint storage inside the roots
the deployment allows (Settings.allowed_data_roots / allowed_storage).

Checked at the REST edge (POST /runs) before the controller sees the spec; the embedded
demo and Python callers of `Controller.submit` are trusted and not checked.

The answer never depends on what exists on the host: paths are resolved without
requiring them to exist (symlinks and `..` resolved as far as they exist), and the
error repeats only the value the caller sent, never a resolved path or an allowed root.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from trainguard.service.config import OBJECT_STORE_SCHEMES, Settings
from trainguard.service.errors import InvalidRequest
from trainguard.workers.spec import PipelineSpec

__all__ = ["check_pipeline_access", "data_path_allowed", "storage_allowed"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_SHOWN = 120  # characters of a rejected value repeated in the error


def check_pipeline_access(spec: PipelineSpec, settings: Settings) -> None:
    """Raise InvalidRequest naming the first field that reaches outside the allowed roots."""
    for name, path in spec.data.items():
        if not data_path_allowed(path, settings.allowed_data_roots):
            raise InvalidRequest(f"data.{name}: {_shown(path)} is not under an allowed data root "
                                 f"(the deployment's TRAINGUARD_ALLOWED_DATA_ROOTS)")
    hf = spec.model.hf
    if hf is not None and hf.path is not None and not data_path_allowed(hf.path, settings.allowed_data_roots):
        raise InvalidRequest(f"model.hf.path: {_shown(hf.path)} is not under an allowed data root "
                             f"(a model folder must be; the deployment's TRAINGUARD_ALLOWED_DATA_ROOTS)")
    for field, storage in _storage_fields(spec):
        if storage is not None and not storage_allowed(storage, settings.allowed_storage):
            raise InvalidRequest(f"{field}: {_shown(storage)} is not an allowed checkpoint storage "
                                 f"(an absolute folder or object-store prefix under the deployment's "
                                 f"TRAINGUARD_ALLOWED_STORAGE; no other URL schemes, no '::' chains)")


def _storage_fields(spec: PipelineSpec) -> Iterable[tuple[str, str | None]]:
    yield "checkpoint.storage", spec.checkpoint.storage
    for i, stage in enumerate(spec.stages):
        if stage.checkpoint is not None:
            yield f"stages.{i}.checkpoint.storage", stage.checkpoint.storage


def data_path_allowed(path: str, roots: Iterable[str]) -> bool:
    """An absolute local path whose real location lies under one of `roots` (already resolved)."""
    real = _real_local(path)
    return real is not None and any(_under(real, root) for root in roots)


def storage_allowed(value: str, allowed: Iterable[str]) -> bool:
    """A local folder under an allowed local root, or an object-store URL under an allowed prefix."""
    if "::" in value:  # fsspec chaining: `simplecache::http://...` and friends
        return False
    m = _URL.match(value)
    if m is None:
        real = _real_local(value)
        return real is not None and any(_under(real, root) for root in allowed if "://" not in root)
    if m.group(1).lower() == "file":  # fsspec's spelling of a local path
        return storage_allowed(m.group(2), allowed) if m.group(2).startswith("/") else False
    url = _plain_object_url(m.group(1).lower(), m.group(2))
    return url is not None and any(_under(url, root) for root in allowed if "://" in root)


def _plain_object_url(scheme: str, rest: str) -> str | None:
    """`scheme://bucket/key...` with no credentials, query, fragment or dot segments; else None."""
    if scheme not in OBJECT_STORE_SCHEMES or any(c in rest for c in "@?#\\") or _has_control(rest):
        return None
    parts = rest.rstrip("/").split("/")
    if not parts[0] or any(p in ("", ".", "..") for p in parts):
        return None
    return f"{scheme}://{'/'.join(parts)}"


def _real_local(path: str) -> str | None:
    """The absolute path with symlinks and `..` resolved, or None when it is no absolute path."""
    if not path.startswith("/") or _has_control(path):
        return None
    try:
        return os.path.realpath(path)  # strict=False: the same answer whether it exists or not
    except (OSError, ValueError):
        return None


def _under(candidate: str, root: str) -> bool:
    # By path segments: /data/corpus-evil is not under /data/corpus.
    if "://" in root:
        return candidate == root or candidate.startswith(root + "/")
    return PurePosixPath(candidate).is_relative_to(root)


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")
