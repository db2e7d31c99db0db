"""Where cifarnet keeps its files (runs, datasets, caches and the torch hub), and whether it can write there.

Everything lives under the user's platform directories (platformdirs) unless ``CIFARNET_HOME`` moves it:
one variable moves everything cifarnet writes (runs, datasets, the decoded-image cache).
``CIFARNET_DATA`` and ``CIFARNET_CACHE`` are finer overrides of the data set and the cache. Downloaded
ResNet-50 weights go to torchvision's own hub cache (``TORCH_HOME``), so both tools share them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from cifarnet_cli.fileio import display, problem

APP_NAME = "cifarnet"


def _from_env(value: str) -> Path:
    # Absolute: a run records where its data is, and a relative path means another place from another folder.
    return Path(os.path.abspath(os.path.expanduser(value)))


def home_dir() -> Path:
    """Root of everything cifarnet writes: ``$CIFARNET_HOME`` or the platform's user data dir."""
    env = os.environ.get("CIFARNET_HOME")
    return _from_env(env) if env else Path(platformdirs.user_data_dir(APP_NAME))


def runs_dir() -> Path:
    return home_dir() / "runs"


def datasets_dir() -> Path:
    return home_dir() / "datasets"


def default_data_dir() -> Path:
    """Default CIFAR-10 location: ``$CIFARNET_DATA``, else ``<home>/datasets/cifar10``."""
    env = os.environ.get("CIFARNET_DATA")
    return _from_env(env) if env else datasets_dir() / "cifar10"


def cache_dir() -> Path:
    """Decoded image-folder caches: ``$CIFARNET_CACHE``, else ``$CIFARNET_HOME/cache``, else the
    platform's user cache dir."""
    env = os.environ.get("CIFARNET_CACHE")
    if env:
        return _from_env(env)
    return home_dir() / "cache" if os.environ.get("CIFARNET_HOME") else Path(platformdirs.user_cache_dir(APP_NAME))


def torch_hub_checkpoints_dir() -> Path:
    """The folder torchvision downloads weights to, so both tools reuse each other's files."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        base = Path(torch_home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"
    return base / "hub" / "checkpoints"


def _folder_problem(path: Path) -> str | None:
    """Why cifarnet could not write into ``path`` (None when it can, or can create it)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{display(existing)} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "the file system is read-only" if _read_only(existing) else "no permission to write there"
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Folder:
    what: str  # home, runs, datasets, cache
    path: Path
    problem: str | None  # why cifarnet cannot write there; None when it can
    inside: str | None = None  # the unusable folder this one is inside of (its problem is that one's)


def folder_status() -> list[Folder]:
    """Each folder cifarnet writes to, and whether it can (CIFARNET_HOME a file, a read-only disk ...)."""
    out: list[Folder] = []
    for what, path in (
        ("home", home_dir()),
        ("runs", runs_dir()),
        ("datasets", datasets_dir()),
        ("cache", cache_dir()),
    ):
        parent = next((f for f in out if f.problem is not None and path.is_relative_to(f.path)), None)
        if parent is not None:  # same problem: said once, for the outer folder
            out.append(Folder(what, path, parent.problem, inside=parent.what))
            continue
        try:
            why = _folder_problem(path)
        except OSError as exc:
            why = problem(exc, path)
        out.append(Folder(what, path, why))
    return out
