"""Files: output paths checked before the work starts, atomic writes, .npz reads (private).

- :func:`check_output_path` and :func:`check_output_dir` say, before any work starts,
  why an output could not be written (a missing or read-only directory, a path that is
  a directory, a device or a dangling symlink), in one line naming the path.
- :func:`atomic_write` writes a regular file so that a crash never leaves a
  half-written one; it refuses to replace anything but a regular file and follows
  symlinks to their final target.
- :func:`read_npz` reads every array of an ``.npz`` file without pickles, and says
  what the file is when it is not an ``.npz`` archive.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import zipfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

__all__ = [
    "OutputPathError",
    "NpzError",
    "atomic_write",
    "check_output_path",
    "check_output_dir",
    "read_npz",
]

_NPY_MAGIC = b"\x93NUMPY"


class OutputPathError(ValueError):
    """An output path that cannot, or must not, be written."""


class NpzError(ValueError):
    """A file that is not a readable ``.npz`` archive of plain (unpickled) arrays."""


def _kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, with an article: "a directory", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _label(path: str, what: str) -> str:
    return f"{what} {path}" if what else path


def _target(path: str, what: str) -> tuple[str, os.stat_result | None]:
    """The file a write to ``path`` must replace, and its status (None if absent).

    A symlink is followed to its final target; a dangling or looping symlink, and a
    target that exists but is not a regular file, raise :class:`OutputPathError`.
    """
    label = _label(path, what)
    if not path:
        raise OutputPathError(f"{_label(repr(path), what)}: expected a file name, got ''")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise OutputPathError(f"{label}: expected a file name, got a directory name")
    link = os.path.islink(path)
    target = path
    if link:
        try:
            target = os.path.realpath(path, strict=True)
        except FileNotFoundError:
            raise OutputPathError(
                f"{label}: is a symlink to {os.readlink(path)}, which does not exist "
                "(a dangling symlink is not followed)"
            ) from None
        except OSError as exc:  # a symlink loop (ELOOP)
            raise OutputPathError(
                f"{label}: is a symlink that cannot be resolved ({exc.strerror})"
            ) from None
    try:
        st: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise OutputPathError(f"{label}: cannot be examined ({exc.strerror})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what_it_is = f"is a symlink to {target}, which is" if link else "is"
        raise OutputPathError(f"{label}: {what_it_is} {_kind(st.st_mode)}, not a regular file")
    return target, st


def _check_directory(directory: str, label: str) -> None:
    """Raise :class:`OutputPathError` unless files can be created in ``directory``."""
    if not os.path.isdir(directory):
        ancestor = directory
        while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if ancestor != directory and os.path.isdir(ancestor):
            raise OutputPathError(f"{label}: directory {directory} does not exist")
        if os.path.lexists(ancestor):
            if os.path.islink(ancestor) and not os.path.exists(ancestor):
                raise OutputPathError(
                    f"{label}: {ancestor} is a symlink to {os.readlink(ancestor)}, "
                    "which does not exist"
                )
            kind = _kind(os.stat(ancestor).st_mode)
            raise OutputPathError(f"{label}: {ancestor} is {kind}, not a directory")
        raise OutputPathError(f"{label}: directory {directory} does not exist")
    # Creating a file is the only test that holds everywhere (permissions, ACLs,
    # read-only mounts, and root, who passes os.access on any directory).
    probe = os.path.join(directory, f".cpusparse-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except PermissionError:
        raise OutputPathError(f"{label}: directory {directory} is not writable") from None
    except OSError as exc:
        raise OutputPathError(
            f"{label}: cannot create files in directory {directory} ({exc.strerror})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike[str], what: str = "") -> str:
    """Check that a file can be written at ``path``; return the file that will be written.

    Meant to be called before any work starts, so that a run does not fail at its
    end. Nothing is written (a probe file is created and removed in the directory).

    Parameters
    ----------
    path : str or os.PathLike
        The output file. It may exist (a regular file, or a symlink to one: the
        symlink's final target is what :func:`atomic_write` replaces).
    what : str, optional
        How the path was given, e.g. ``"--checkpoint"``; starts every message.

    Returns
    -------
    target : str
        ``path``, or the final target of the symlink ``path``.

    Raises
    ------
    OutputPathError
        (a ``ValueError``) with a one-line message such as
        ``"--checkpoint /tmp/x/run.npz: directory /tmp/x does not exist"``: the
        directory is missing, not a directory or not writable; the path is a
        directory, a device, a FIFO, a socket, or a dangling or looping symlink.
    """
    path = os.fspath(path)
    target, _ = _target(path, what)
    _check_directory(os.path.dirname(os.path.abspath(target)), _label(path, what))
    return target


def check_output_dir(path: str | os.PathLike[str], what: str = "") -> str:
    """Check that ``path`` is, or can be created as, a writable directory.

    Parameters
    ----------
    path : str or os.PathLike
        An existing directory (or a symlink to one), or a new directory whose
        parent exists (only the last component is created by the caller).
    what : str, optional
        How the path was given, e.g. ``"--out"``; starts every message.

    Returns
    -------
    path : str

    Raises
    ------
    OutputPathError
        If ``path`` exists and is not a directory (or is a dangling symlink), or
        if no directory can be created or written there.
    """
    path = os.fspath(path)
    label = _label(path, what)
    if not path:
        raise OutputPathError(f"{_label(repr(path), what)}: expected a directory name, got ''")
    if os.path.lexists(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise OutputPathError(
                f"{label}: is a symlink to {os.readlink(path)}, which does not exist"
            )
        mode = os.stat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise OutputPathError(f"{label}: is {_kind(mode)}, not a directory")
        _check_directory(path, label)
    else:
        _check_directory(os.path.dirname(os.path.abspath(path)), label)
    return path


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _temp_pattern(name: str) -> re.Pattern[str]:
    # ".<name>.<pid>.<8 hex digits>.tmp": the pid says whether its writer still runs.
    return re.compile(re.escape(f".{name}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True when that cannot be known)."""
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True


def _remove_stale(directory: str, name: str) -> None:
    """Remove the temporary files of ``name`` left by writers that no longer run."""
    pattern = _temp_pattern(name)
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass


def _create_temp(directory: str, name: str, st: os.stat_result | None) -> tuple[int, str]:
    """Create the temporary file next to the target; with its mode (and owner) if any."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        break
    if st is None:
        return fd, tmp
    try:
        if hasattr(os, "fchown") and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            try:  # keep the owner when allowed (root), else at least the group
                os.fchown(fd, st.st_uid, st.st_gid)
            except OSError:
                try:
                    os.fchown(fd, -1, st.st_gid)
                except OSError:
                    pass
        if hasattr(os, "fchmod"):
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)
        else:  # pragma: no cover - not POSIX
            os.chmod(tmp, stat.S_IMODE(st.st_mode) & 0o777)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write a regular file atomically: a temporary file in the same directory, then rename.

    Parameters
    ----------
    path : str or os.PathLike
        Destination. An existing file is replaced only once the new content is
        completely written and flushed to disk, so a crash at any point leaves
        either the old file or the new one, never a mix.
    write : callable
        Called with a binary file object opened for writing.

    Raises
    ------
    OutputPathError
        (a ``ValueError``) if ``path`` is a directory, a device, a FIFO, a socket,
        or a dangling or looping symlink: only regular files are replaced.
    OSError
        If the directory does not exist or cannot be written.

    Notes
    -----
    - **Symlinks are followed**: if ``path`` is a symlink, its final target is
      replaced (atomically, by a file in the target's directory) and the symlink
      itself is left in place, still pointing to the new content.
    - The new file gets the permission bits (and, where allowed, the owner and
      group) of the file it replaces; a new file gets ``0o666`` minus the umask,
      as :func:`open` would give it.
    - The temporary file is named ``.<name>.<pid>.<random>.tmp``. It is removed
      when ``write`` raises (Ctrl-C included); one left by a writer that was
      killed (SIGKILL, power loss) is removed by the next write to the same
      path, once no process with its pid runs.
    """
    path = os.fspath(path)
    target, st = _target(path, "")
    directory, name = os.path.split(os.path.abspath(target))
    _remove_stale(directory, name)
    fd, tmp = _create_temp(directory, name, st)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; not possible everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------
# Reading .npz files
# ---------------------------------------------------------------------------


def read_npz(path: str | os.PathLike[str], what: str = "file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, in file order, as writable arrays; no pickles.

    Parameters
    ----------
    path : str or os.PathLike
    what : str, default="file"
        What the file is meant to be (``"checkpoint"``, ``"trace"``); starts every
        message.

    Returns
    -------
    arrays : dict of str to ndarray

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    NpzError
        (a ``ValueError``) saying what the file is instead: a directory or another
        non-regular file, an empty file, a ``.npy`` file, not a zip archive
        (truncated, or another kind of file), a corrupt archive, an archive with
        pickled (object) arrays or with members that are not ``.npy`` arrays.
    """
    path = os.fspath(path)
    where = f"{what} {path!r}"
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{where} does not exist") from None
    except OSError as exc:
        raise NpzError(f"{where} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise NpzError(f"{where} is {_kind(st.st_mode)}, not an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise NpzError(f"{where} cannot be read ({exc.strerror})") from None
    if not is_zip:
        if not head:
            raise NpzError(f"{where} is empty, not an .npz (zip) archive")
        if head == _NPY_MAGIC:
            raise NpzError(f"{where} is a .npy file (one array), not an .npz (zip) archive")
        raise NpzError(
            f"{where} is not a valid .npz (zip) archive (truncated, or another kind of file)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # zip data that does not start with a zip header
        raise NpzError(f"{where} is not a valid .npz (zip) archive") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise NpzError(f"{where} is not a valid .npz (zip) archive: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise NpzError(f"{where} is not a valid .npz (zip) archive")
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for name in loaded.files:
            try:
                value = loaded[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise NpzError(
                        f"{where} holds a pickled (object) array {name!r}; such arrays are "
                        "never loaded"
                    ) from None
                raise NpzError(f"{where} is corrupt: array {name!r}: {exc}") from None
            except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
                raise NpzError(f"{where} is corrupt: array {name!r}: {exc}") from None
            if not isinstance(value, np.ndarray):
                raise NpzError(f"{where} holds a member {name!r} that is not a .npy array")
            arrays[name] = value if value.flags.writeable else value.copy()
    return arrays
