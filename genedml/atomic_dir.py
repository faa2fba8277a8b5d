"""Directories that appear whole or not at all: write under a staging name, then rename into place.

A directory is written as `.<name>.staging.<pid>` beside its final path, given one file mode, listed in a
`MANIFEST.json` (every file's size and SHA-256, written last), and renamed into place. Replacing an existing
directory swaps the two atomically (Linux `renameat2(RENAME_EXCHANGE)`); elsewhere the old directory is
renamed aside to `.<name>.old.<pid>` first, and `resolve_dir` / `recover_interrupted` handle a crash in the
moment between the two renames. A reader therefore sees the complete old or the complete new directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from genedml.errors import ConfigError, ModelDirError
from genedml.log import log

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "genedml-manifest/1"
FILE_MODE, DIR_MODE = 0o644, 0o755
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)\.(?P<pid>\d+)$")
_RENAME_EXCHANGE = 2


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging.{os.getpid()}"


def aside_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old.{os.getpid()}"


def check_destination(out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Refuse before any work: `out` is a file, exists without `overwrite`, is not `what`, or cannot be written."""
    recover_interrupted(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a directory path for the {what}.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{flag} {out} already exists; pass --overwrite to replace it (the old {what} stays "
                              "intact until the new one is complete) or choose another path.")
        if not replaceable(out):
            raise ConfigError(f"{flag} {out} is a non-empty folder that is not a {what}; refusing to replace it.")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: no permission to write in {parent}.")


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success give it one mode, a manifest, and rename it to `out`.

    On an exception the staging folder is removed and `out` is untouched.
    """
    out = Path(out)
    check_destination(out, overwrite, replaceable, what)
    stage = staging_path(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        normalise_modes(stage)
        write_manifest(stage)
        publish(stage, out, overwrite, replaceable, what)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def normalise_modes(root: Path) -> None:
    """Every file 0644 and every folder 0755, less the umask (libraries create some files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, DIR_MODE & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE & ~mask)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digest(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def write_manifest(root: Path) -> dict[str, Any]:
    """MANIFEST.json: a fresh id and every file's size and SHA-256 (files are synced to disk on the way)."""
    files = {name: {"size": (root / name).stat().st_size, "sha256": file_digest(root / name, sync=True)} for name in _files(root)}
    manifest = {"format": MANIFEST_FORMAT, "id": uuid.uuid4().hex, "files": files}
    path = root / MANIFEST
    with open(path, "w") as handle:
        handle.write(json.dumps(manifest, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, FILE_MODE & ~_umask())
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of `root`, or None when it has none (written before manifests existed)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path} is unreadable ({exc}); the directory is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise ModelDirError(f"{path} is not a {MANIFEST_FORMAT} manifest; the directory is damaged.")
    return manifest


def verify_dir(root: Path, watched: Callable[[str], bool] = lambda name: True) -> dict[str, Any] | None:
    """Check every listed file's size and SHA-256, and that no `watched` file is there unlisted.

    Returns the manifest (None when there is none); a difference raises ModelDirError naming the files.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        return None
    listed = manifest["files"]
    problems = []
    for name, entry in listed.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != entry.get("size") or file_digest(path) != entry.get("sha256"):
            problems.append(f"{name} changed")
    problems += [f"{name} not in the manifest" for name in _files(root) if name not in listed and watched(name)]
    if problems:
        shown = ", ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ModelDirError(f"{root} does not match its {MANIFEST} ({shown}): the directory is damaged or mixes "
                            "files of different runs; write it again.")
    return manifest


def publish(stage: Path, out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """Rename the complete `stage` to `out`, replacing an existing `out` only with `overwrite`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder is no model to keep
    if not out.exists():
        os.rename(stage, out)
    else:
        check_destination(out, overwrite, replaceable, what)  # it may have appeared while we worked
        if exchange(stage, out):  # stage now holds the old directory
            _sync_dir(out.parent)
            shutil.rmtree(stage, ignore_errors=True)
            return
        aside = aside_path(out)
        os.rename(out, aside)
        try:
            os.rename(stage, out)
        except BaseException:
            os.rename(aside, out)
            raise
        _sync_dir(out.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return
    _sync_dir(out.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(errno, f"cannot swap {a} and {b}: {os.strerror(errno)}")


def _renameat2() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _sync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(out: Path) -> list[tuple[Path, str, int]]:
    """(path, "staging" | "old", pid) of the staging and set-aside folders of `out` in its parent."""
    if not out.parent.is_dir():
        return []
    found = []
    for path in out.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == out.name:
            found.append((path, match["kind"], int(match["pid"])))
    return found


def resolve_dir(out: Path) -> Path:
    """`out`, or the complete old directory a writer set aside when it died between its two renames."""
    out = Path(out)
    if out.exists():
        return out
    for path, kind, _ in leftovers(out):
        # Set aside by a writer between its two renames (still running or killed there): the complete old version.
        if kind == "old" and _complete(path):
            log.warning("%s is missing; using its previous version %s, set aside by a write that is running or was interrupted", out, path)
            return path
    return out


def recover_interrupted(out: Path) -> None:
    """Put back a set-aside old directory of a dead writer when `out` is missing; drop dead writers' leftovers."""
    for path, kind, pid in leftovers(out):
        if _pid_alive(pid):
            continue
        if kind == "old" and not out.exists() and _complete(path):
            log.warning("restoring %s from %s (a write into it was interrupted)", out, path)
            os.rename(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _complete(path: Path) -> bool:
    try:
        return verify_dir(path) is not None
    except ModelDirError:
        return False
