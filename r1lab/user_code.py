"""A user's own callable named `module:name` or `path/to/file.py:name` (rewards, tasks).

A file path is read relative to the working directory, so `myreward.py:score` works where
the file is, with no PYTHONPATH; its folder is importable while it loads (so it may import
its neighbours). `module:name` is imported as usual, and when no such module is installed a
`module.py` in the working directory is used. A failing import is an error naming the file,
the line it failed at and the error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


class UserCodeError(ValueError):
    """A user callable that cannot be found or imported; the message says where and why."""


def _failure(what: str, path: Path, err: BaseException) -> UserCodeError:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    if isinstance(err, SyntaxError) and err.lineno:
        where = f"{path}:{err.lineno}"
    return UserCodeError(f"{what}: importing {where} failed: {type(err).__name__}: {err}")


def load_file(path: str | Path, what: str) -> ModuleType:
    """The module of a Python file (loaded once per resolved path)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserCodeError(f"{what}: file {path} not found (relative to {Path.cwd()})")
    path = path.resolve()
    name = f"r1lab_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as import does (dataclasses, pickling)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _failure(what, path, err) from err
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _load_module(module_name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        local = Path(*module_name.split(".")).with_suffix(".py")
        missing = err.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            if local.is_file():
                return load_file(local, what)
            raise UserCodeError(
                f"{what}: no module named {module_name!r} (nor {local} in {Path.cwd()}); "
                "name a file as path/to/file.py:function, or add its folder to PYTHONPATH"
            ) from err
        raise UserCodeError(f"{what}: importing {module_name!r} failed: {err}") from err
    except Exception as err:
        origin = getattr(importlib.util.find_spec(module_name), "origin", None)
        if origin:
            raise _failure(what, Path(origin), err) from err
        raise UserCodeError(f"{what}: importing {module_name!r} failed: {err}") from err


def is_file_spec(spec: str) -> bool:
    target = spec.rpartition(":")[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def load_callable(spec: str, kind: str = "reward") -> Callable[..., Any]:
    """The callable `spec` names: `module:name` or `path/to/file.py:name`."""
    what = f"{kind} {spec!r}"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserCodeError(f"{what}: expected module:name or path/to/file.py:name")
    module = load_file(target, what) if is_file_spec(spec) else _load_module(target, what)
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserCodeError(
            f"{what}: {getattr(module, '__file__', target)} has no {attr!r}; "
            f"it defines: {', '.join(public) or 'no callables'}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserCodeError(f"{what}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn
