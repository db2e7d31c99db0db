"""Finding image files under a folder: each real file once, whatever links point where.

Symbolic links are followed (a folder of links to images kept elsewhere is a common way to build a
subset), but every folder is entered once and every file is used once, identified by ``(st_dev, st_ino)``
of what the link resolves to. So ``ln -s . cat/self`` or ``cat/todog -> ../dog`` cannot make the walk run
forever, and the same image cannot end up twice in a data set (in both the training and the validation
split). Folders that are reserved for another purpose (the other class folders of a data set) are never
entered through a link, nor is a folder a link leads out to that holds the walk's own folder (``/``, a parent:
every sibling of the data would be read) or one of the system's (``/proc``, ``/sys``, ``/dev``: a link to
``/`` made predict read 109,429 entries in 8.2 s, one to ``/proc/self`` took 9.4 s). File names are whatever the operating system allows: names that are not valid
UTF-8 stay as Python keeps them (surrogate escapes) and are printed with :func:`fileio.display`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cifarnet_cli.data.images import is_image_file
from cifarnet_cli.fileio import display, problem

_FileKey = tuple[int, int]


def _key(st: os.stat_result) -> _FileKey:
    return (st.st_dev, st.st_ino)


#: Folders of the operating system that a link never leads the walk into: they hold no images, and /proc and
#: /sys are huge (a process's view of the whole machine, again per process).
SYSTEM_FOLDERS: tuple[str, ...] = ("/proc", "/sys", "/dev")
#: Folders under those that hold users' files: /dev/shm is a RAM disk where data is put for speed.
USER_FOLDERS: tuple[str, ...] = ("/dev/shm",)


def _lineage(folder: str | os.PathLike[str]) -> set[_FileKey]:
    """The identities of ``folder`` (resolved) and of every folder above it, up to ``/``."""
    real = Path(os.path.realpath(folder))
    keys = set()
    for p in (real, *real.parents):
        with contextlib.suppress(OSError):
            keys.add(_key(os.stat(p)))
    return keys


def _in_system_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` (resolved) is one of :data:`SYSTEM_FOLDERS` or below one, and not a user folder
    there; compared by identity, so /proc is recognised under any name."""
    system: set[_FileKey] = set()
    users: set[_FileKey] = set()
    for folders, keys in ((SYSTEM_FOLDERS, system), (USER_FOLDERS, users)):
        for name in folders:
            with contextlib.suppress(OSError):
                keys.add(_key(os.stat(name)))
    lineage = _lineage(folder)
    return bool(system & lineage) and not users & lineage


def _link_refused(link: str | os.PathLike[str], key: _FileKey, lineage: set[_FileKey]) -> str | None:
    """Why the walk does not follow the link ``link`` (to the folder ``key``) from a walk whose folder and its
    ancestors are ``lineage``; None when it may."""
    target = display(os.path.realpath(link))
    if key in lineage:
        return f"a symbolic link to {target}, the folder being read or one above it: not followed"
    if _in_system_folder(link):
        return f"a symbolic link into a system folder ({target}): not followed"
    return None


def too_wide(folder: str | os.PathLike[str]) -> str | None:
    """Why a folder named to be read (predict's input, a --data-dir) is not walked, itself or through a
    link: ``/`` (every file of the machine) or a system folder (/proc, /sys, /dev: no images, and /proc and
    /sys are huge); None when it may be."""
    real = os.path.realpath(folder)
    with contextlib.suppress(OSError):
        if os.path.samestat(os.stat(real), os.stat("/")):
            return f"{display(real)} is the root of the file system (every file of this machine): name the folder of the images"
    if _in_system_folder(real):
        return f"{display(real)} is a system folder, which holds no images: name the folder of the images"
    return None


_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def not_a_file(st: os.stat_result) -> str | None:
    """Why an entry that is not a regular file cannot be read as an image (opening a FIFO or a terminal
    would block the reader forever); None for a regular file."""
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((what for test, what in _SPECIAL if test(st.st_mode)), "a special file")
    return f"{kind}, not a regular file: not opened"


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # through a link, as os.walk(followlinks=True) enters it
    except OSError:
        return False


@dataclass
class ImageWalk:
    """A walk over one or more folders that shares what it has seen: a file reached a second time (through
    a link, or a hard link) is skipped and counted, as is a linked folder that leads back to one already
    visited (a loop) or to a reserved folder; a link out to a folder above the walk's or into a system
    folder is not followed, and recorded with the reason."""

    reserved: Iterable[Path] = ()
    duplicates: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._files: set[_FileKey] = set()
        self._dirs: set[_FileKey] = set()
        self._reserved: set[_FileKey] = set()
        for folder in self.reserved:
            try:
                self._reserved.add(_key(os.stat(folder)))
            except OSError:
                continue

    def files(self, folder: Path) -> list[Path]:
        """Image files under ``folder`` (recursively, hidden names skipped), sorted, each real file once."""
        return [path for path, _st in self.entries(folder)]

    def entries(self, folder: Path) -> list[tuple[Path, os.stat_result]]:
        """Like :meth:`files`, with the ``os.stat`` of each file (of the file a link points to)."""
        try:
            top = _key(os.stat(folder))
        except OSError as exc:
            self.unreadable.append((folder, problem(exc, folder)))
            return []
        if top in self._dirs:
            self.loops.append(folder)
            return []
        self._dirs.add(top)
        lineage = _lineage(folder)
        found: list[tuple[Path, os.stat_result]] = []

        def on_error(exc: OSError) -> None:
            where = Path(exc.filename) if exc.filename else folder
            self.unreadable.append((where, problem(exc, where)))

        for dirpath, dirs, names in os.walk(folder, followlinks=True, onerror=on_error):
            keep = []
            for d in sorted(dirs):
                if d.startswith("."):
                    continue
                sub = os.path.join(dirpath, d)
                try:
                    key = _key(os.stat(sub))
                except OSError as exc:
                    self.unreadable.append((Path(sub), problem(exc, sub)))
                    continue
                if key in self._dirs or key in self._reserved:
                    self.loops.append(Path(sub))
                    continue
                why = _link_refused(sub, key, lineage) if os.path.islink(sub) else None
                if why is not None:
                    self.refused.append((Path(sub), why))
                    continue
                self._dirs.add(key)
                keep.append(d)
            dirs[:] = keep  # os.walk descends only into these, in sorted order
            for name in sorted(names):
                if name.startswith(".") or not is_image_file(name):
                    continue
                path = Path(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError as exc:  # a dangling link, no permission
                    self.unreadable.append((path, problem(exc, path)))
                    continue
                special = not_a_file(st)
                if special is not None:  # a FIFO or device named *.png would block the decoder
                    if _key(st) not in self._files:  # said once, like every file
                        self._files.add(_key(st))
                        self.unreadable.append((path, special))
                    continue
                found.append((path, st))
        out = []
        for path, st in sorted(found, key=lambda item: item[0]):
            key = _key(st)
            if key in self._files:
                self.duplicates.append(path)
                continue
            self._files.add(key)
            out.append((path, st))
        return out

    def visited(self, folder: Path) -> bool:
        """Whether the walk has already entered ``folder`` (named twice, or inside a folder named before)."""
        try:
            return _key(os.stat(folder)) in self._dirs
        except OSError:
            return False

    def file(self, path: Path) -> os.stat_result | str | None:
        """A file named on its own (not found by walking): its ``os.stat`` when it is a regular file not seen
        before; the reason (recorded as unreadable) when it cannot be read; None for a file already taken."""
        try:
            st = os.stat(path)
        except OSError as exc:
            why = problem(exc, path)
            self.unreadable.append((path, why))
            return why
        if _key(st) in self._files:
            self.duplicates.append(path)
            return None
        self._files.add(_key(st))
        special = not_a_file(st)
        if special is not None:
            self.unreadable.append((path, special))
            return special
        return st

    def glob(self, pattern: str) -> list[Path]:
        """The paths matching the shell pattern ``pattern`` (``*``, ``?``, ``[...]``; ``**`` for any number of
        folders), sorted, with the walk's rules: names starting with "." are matched only by a pattern that
        starts with "."; under ``**`` each real folder is entered once, so symbolic-link loops end instead of
        repeating (glob.glob follows them ~40 levels deep, once per loop: two loops never finish). Folders
        that cannot be listed are recorded as unreadable. The paths are not checked to be files: pass them
        to :meth:`file`."""
        path = Path(os.path.expanduser(pattern))
        root, parts = (Path(path.anchor), path.parts[1:]) if path.is_absolute() else (Path(), path.parts)
        found: set[Path] = set()
        entered: set[tuple[int, int, int]] = set()  # (device, inode, pattern index): each state once
        stack = [(root, 0)]
        while stack:
            base, i = stack.pop()
            if i == len(parts):
                found.add(base)
                continue
            part = parts[i]
            if not _has_magic(part):
                stack.append((base / part, i + 1))
                continue
            if part == "**":
                try:
                    key = _key(os.stat(base))
                except OSError:
                    continue
                if (*key, i) in entered:  # a loop, or a folder reached again through a link
                    continue
                entered.add((*key, i))
                stack.append((base, i + 1))  # no folder at all
            for entry in self._listing(base):
                if entry.name.startswith(".") and not part.startswith("."):
                    continue
                if part == "**":
                    if _is_dir(entry) and not self._refuse(entry, base, entered, i):
                        stack.append((base / entry.name, i))  # one more folder
                elif fnmatch.fnmatch(entry.name, part) and (i + 1 == len(parts) or _is_dir(entry)):
                    stack.append((base / entry.name, i + 1))
        return sorted(found)

    def _refuse(self, entry: os.DirEntry[str], base: Path, entered: set[tuple[int, int, int]], i: int) -> bool:
        """Whether ``**`` must not descend through the link ``entry`` (recorded with the reason); a link to a
        folder already ``entered`` is a loop, ended quietly when it comes off the stack."""
        try:
            if not entry.is_symlink():
                return False
            key = _key(os.stat(entry.path))
            why = None if (*key, i) in entered else _link_refused(entry.path, key, _lineage(base))
        except OSError:
            return False
        if why is not None:
            self.refused.append((Path(entry.path), why))
        return why is not None

    def _listing(self, folder: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                return list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            self.unreadable.append((folder, problem(exc, folder)))
            return []

    def warnings(self, root: Path | None = None) -> list[str]:
        """One sentence per kind of skipped entry, naming a few of them (relative to ``root``)."""

        def show(paths: list[Path]) -> str:
            shown = []
            for p in paths[:3]:
                rel = p.relative_to(root) if root is not None and p.is_relative_to(root) else p
                shown.append(display(rel))
            return ", ".join(shown) + (" ..." if len(paths) > 3 else "")

        out = []
        if self.duplicates:
            out.append(
                f"Skipped {len(self.duplicates)} duplicate image file(s) (the same file reached again through "
                f"a link; each file is used once): {show(self.duplicates)}"
            )
        if self.loops:
            out.append(
                f"Skipped {len(self.loops)} linked folder(s) that lead back to a folder already read (a "
                f"symbolic-link loop or a link to another class): {show(self.loops)}"
            )
        if self.refused:
            out.append(
                f"{len(self.refused)} symbolic link(s) not followed: they lead to the data's own folder or one "
                f"above it, or into a system folder ({', '.join(SYSTEM_FOLDERS)}), and would read far more "
                f"than the data: {show([p for p, _why in self.refused])}"
            )
        if self.unreadable:
            first, why = self.unreadable[0]
            out.append(
                f"Skipped {len(self.unreadable)} file(s) or folder(s) that cannot be opened, e.g. "
                f"{show([first])} ({why})"
            )
        return out
