"""User code a pipeline may run: `kind: custom` (a Stage subclass) and `kind: loop` (a function
driven through the loop API), named by `entrypoint: package.module:attribute`.

Which modules may be named is the deployment's decision (`UserCode.modules`, from the
settings TRAINGUARD_USER_CODE_MODULES; `UserCode.paths` are folders put on the workers'
import path). A pipeline only picks among them. The supervisor never imports user code:

- `entrypoint_refusal` is pure string work (the allow-list), used by the supervisor and again
  by the workers before they import anything;
- `check_entrypoints` imports and inspects, and runs only inside a Ray task of its own process
  (`check_entrypoints_remote`, `max_calls=1`: the process exits after one check, so no user
  module stays loaded in a pooled worker);
- `load_entrypoint` is what a rank's actor calls before it trains.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["UserCode", "UserCodeError", "entrypoint_refusal", "load_entrypoint", "check_entrypoints",
           "check_entrypoints_remote", "STAGE_API_VERSION"]

STAGE_API_VERSION = 1
"""The version of the stage interface (workers/stages/base.py) and the loop API
(workers/runtime/loop.py) this trainguard offers; a user class may pin it with `api_version`."""


class UserCodeError(ValueError):
    """An entrypoint that cannot run; the message says why (never a traceback of the user's module)."""


@dataclass(frozen=True)
class UserCode:
    """The deployment's allow-list: module prefixes (`mylab.stages` allows `mylab.stages` and
    `mylab.stages.x`, not `mylab.stages_evil`) and absolute folders added to sys.path."""

    modules: tuple[str, ...] = ()
    paths: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, list[str]]:
        return {"modules": list(self.modules), "paths": list(self.paths)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "UserCode":
        d = d or {}
        return cls(modules=tuple(d.get("modules", ())), paths=tuple(d.get("paths", ())))


def entrypoint_refusal(entrypoint: str, user_code: UserCode) -> str | None:
    """Why `entrypoint` may not be used here (None: allowed). Never imports anything."""
    module, sep, attr = entrypoint.partition(":")
    if not sep or not module or not attr:
        return f"{entrypoint[:200]!r} is not of the form package.module:name"
    if not user_code.modules:
        return ("no user code is allowed in this deployment (the operator lists the allowed module prefixes in "
                "TRAINGUARD_USER_CODE_MODULES)")
    if not any(module == p or module.startswith(p + ".") for p in user_code.modules):
        return (f"module {module!r} is not under an allowed prefix (the deployment's TRAINGUARD_USER_CODE_MODULES: "
                f"{', '.join(user_code.modules)})")
    return None


def load_entrypoint(entrypoint: str, kind: str, user_code: UserCode) -> Any:
    """Import `entrypoint` (allow-list first) and return the stage class (`kind` custom) or the
    loop function (`kind` loop); UserCodeError says what is wrong with it."""
    refusal = entrypoint_refusal(entrypoint, user_code)
    if refusal is not None:
        raise UserCodeError(refusal)
    for p in reversed(user_code.paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserCodeError(f"module {module_name!r} was not found (on the workers' import path and the "
                                f"deployment's TRAINGUARD_USER_CODE_PATHS)") from None
        raise UserCodeError(f"importing {module_name!r} failed: {type(e).__name__}: {_short(e)}") from None
    except Exception as e:  # the user's module raised while it was imported
        raise UserCodeError(f"importing {module_name!r} failed: {type(e).__name__}: {_short(e)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserCodeError(f"module {module_name!r} has no attribute {attr!r}")
    if kind == "custom":
        _check_stage_class(obj, entrypoint)
    elif kind == "loop":
        _check_loop_function(obj, entrypoint)
    else:
        raise UserCodeError(f"stage kind {kind!r} takes no entrypoint")
    return obj


def _check_stage_class(obj: Any, entrypoint: str) -> None:
    from trainguard.workers.stages.base import Stage

    if not (inspect.isclass(obj) and issubclass(obj, Stage)):
        raise UserCodeError(f"{entrypoint} is not a stage class (a subclass of trainguard.workers.stages.base.Stage)")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise UserCodeError(f"{entrypoint} is abstract: it does not implement {missing}")
    version = getattr(obj, "api_version", STAGE_API_VERSION)
    if version != STAGE_API_VERSION:
        raise UserCodeError(f"{entrypoint} is written for stage API version {version!r}; this trainguard offers "
                            f"version {STAGE_API_VERSION}")


def _check_loop_function(obj: Any, entrypoint: str) -> None:
    if inspect.isclass(obj) or not callable(obj):
        raise UserCodeError(f"{entrypoint} is not a function (a loop entrypoint is called with the loop API's context)")
    try:
        inspect.signature(obj).bind(object())
    except TypeError:
        raise UserCodeError(f"{entrypoint} cannot be called with one argument (the loop API's context)") from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass


def check_entrypoints(entries: list[tuple[str, str, str]], user_code: dict[str, Any]) -> dict[str, str]:
    """{field: error} for each (field, kind, entrypoint) that cannot run; empty when all can.
    Imports user code: run it only in a process of its own (`check_entrypoints_remote`)."""
    uc = UserCode.from_dict(user_code)
    errors: dict[str, str] = {}
    for field_name, kind, entrypoint in entries:
        try:
            load_entrypoint(entrypoint, kind, uc)
        except UserCodeError as e:
            errors[field_name] = str(e)
    return errors


def check_entrypoints_remote() -> Any:
    """`check_entrypoints` as a Ray task in a fresh worker process that exits after the call."""
    import ray

    return ray.remote(num_cpus=0, max_calls=1, max_retries=0)(check_entrypoints)


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."
