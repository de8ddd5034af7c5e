"""The one way sat_quant puts files on disk: write a temporary sibling, fsync, then one atomic step.

Every writer (save_checkpoint, convert, dequantize, reshard, merge-lora, plan ``-o``) goes through here:

- ``check_destination`` refuses, before any work, a DST that is SRC, resolves to it, lies inside it or holds it,
  a non-empty DST without ``--overwrite``, and a DST this process could not replace (``check_writable``: a
  read-only parent, DST or folder inside it);
- ``temporary_sibling`` names the writer's own temporary folder next to DST (``.{name}.sat-quant-tmp-{pid}``) and
  removes those a killed earlier run left behind;
- ``publish_folder`` moves a finished folder to DST atomically (a rename, or ``renameat2(RENAME_EXCHANGE)`` when DST
  exists), so a kill at any instant leaves DST as the old complete folder or the new complete one;
- ``write_text_atomic`` does the same for one file (``latest``, model_config.json, a plan).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Tuple

from .._libc import libc
from ..errors import CheckpointError, CheckpointWriteError, QuantError
from ..oom import is_out_of_memory

TMP_MARK = ".sat-quant-tmp-"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (a finished temporary folder, before it is published)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old content or the new, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    folder, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(folder, f"{name}.tmp-")  # left by a writer killed before its os.replace
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a failed write (e.g. ENOSPC) leaves no .tmp file behind
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), b)


def commit_iteration(tmp_dir: str, final_dir: str, single_writer: bool) -> None:
    """Move the finished files of ``tmp_dir`` to ``final_dir`` so that a reader sees all old or all new files.

    One writer: a rename (new iteration) or an atomic swap of the two folders (overwrite; other files of
    the old folder, e.g. SAT's optimizer states, are hard-linked over first); ``tmp_dir`` then holds the
    old files. Several model-parallel ranks share the folder, so each moves its own files one by one.
    """
    if single_writer:
        if not os.path.exists(final_dir):
            os.rename(tmp_dir, final_dir)
            return
        ours = set(os.listdir(tmp_dir))
        others = [n for n in os.listdir(final_dir) if n not in ours]
        if all(os.path.isfile(os.path.join(final_dir, n)) and not os.path.islink(os.path.join(final_dir, n))
               for n in others):
            try:
                for n in others:
                    os.link(os.path.join(final_dir, n), os.path.join(tmp_dir, n))
                if exchange(tmp_dir, final_dir):
                    return
            except OSError:
                pass  # no hard links or no exchange here: move the files one by one below
            for n in others:
                if os.path.exists(os.path.join(tmp_dir, n)):
                    os.unlink(os.path.join(tmp_dir, n))
    os.makedirs(final_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp_dir)):  # per-rank files: other ranks' files stay untouched
        os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, however it arrives: OSError, or safetensors' SafetensorError text ('... (os error 28)')."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    text = str(exc)
    return f"(os error {errno.ENOSPC})" in text or os.strerror(errno.ENOSPC) in text


def write_errors() -> Tuple[type, ...]:
    """Exception types a failed write raises: OSError, safetensors' own error, torch.save's RuntimeError."""
    try:
        from safetensors import SafetensorError
        return (OSError, RuntimeError, SafetensorError)
    except ImportError:
        return (OSError, RuntimeError)


def overlap(src: str, dst: str) -> bool:
    """True when ``dst`` is ``src``, resolves to it (symlinks), lies inside it, or contains it."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    return s == d or s.startswith(d.rstrip(os.sep) + os.sep) or d.startswith(s.rstrip(os.sep) + os.sep)


def check_destination(dst: str, overwrite: bool, *, src: str = "", verb: str = "write") -> None:
    """Refuse, before any work, a destination that would destroy the source or replace something unasked."""
    if src and overlap(src, dst):
        raise CheckpointError(f"{verb}: the destination {dst} overlaps the source {src} (it is the same folder, a "
                              f"link to it, inside it or around it); writing there would destroy the source. "
                              f"Choose a destination outside {src}.")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{verb}: the destination {dst} exists and is not a folder; remove it or choose "
                              f"another destination.")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists and is not empty; pass --overwrite to replace it "
                              f"or choose another destination.")
    check_writable(dst, replace=True, verb=verb)


_EFFECTIVE = {"effective_ids": True} if os.access in os.supports_effective_ids else {}


def _writable(folder: str) -> bool:
    """Whether this process may create and remove entries in ``folder`` (effective ids: what the kernel checks)."""
    return os.access(folder, os.W_OK | os.X_OK, **_EFFECTIVE)


def existing_ancestor(path: str) -> str:
    """``path``'s nearest existing folder (itself when it exists): where a missing chain would be created."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_writable(dst: str, *, replace: bool, verb: str = "write") -> None:
    """Refuse, before any work, a destination this process cannot publish to and clean up after.

    The folder that will hold DST (or the nearest existing one above it) must be writable, and with ``replace``
    so must DST and every folder inside it: the old content is removed once the new one is in place, and a
    read-only folder there would leave it half-removed beside DST.
    """
    parent = existing_ancestor(os.path.dirname(os.path.abspath(dst)))
    if not _writable(parent):
        raise CheckpointWriteError(f"{verb}: cannot write {dst}: the folder {parent} is read-only for this user; "
                                   f"nothing was written. Make it writable (chmod u+w {parent}) or choose another "
                                   f"destination.")
    if replace and os.path.isfile(dst) and not os.access(dst, os.W_OK, **_EFFECTIVE):
        raise CheckpointWriteError(f"{verb}: {dst} is read-only for this user; it was left as it is. Make it "
                                   f"writable (chmod u+w {dst}) or choose another destination.")
    if replace and os.path.isdir(dst) and not os.path.islink(dst):
        for root, _dirs, _files in os.walk(dst):
            if not _writable(root):
                raise CheckpointWriteError(
                    f"{verb}: cannot replace {dst}: the folder {root} is read-only for this user, so its old "
                    f"files could not be removed; {dst} is unchanged. Make it writable (chmod -R u+w {dst}) or "
                    f"choose another destination.")


def write_failed(exc: BaseException, dst: str, verb: str) -> CheckpointWriteError:
    """A failed write (full disk, file-size limit, permissions) as one sentence: what failed, that DST is unchanged."""
    if is_disk_full(exc):
        why = "the disk is full"
    elif getattr(exc, "errno", None) == errno.EFBIG:
        why = "File too large (a file-size limit, `ulimit -f`, or the filesystem's maximum file size)"
    else:
        why = f"{getattr(exc, 'strerror', None) or exc}"
        if getattr(exc, "filename", None):
            why = f"{why} ({exc.filename})"
    return CheckpointWriteError(f"{verb}: writing {dst} failed: {why}. {dst} is unchanged (nothing was replaced); "
                                f"fix the cause (free space, permissions, limits) and run it again.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: str, prefix: str) -> None:
    """Remove ``{prefix}{pid}*`` folders and files in ``parent`` whose writer process is gone (a killed earlier run)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        digits = name[len(prefix):].split("-", 1)[0]
        if digits.isdigit() and int(digits) != os.getpid() and not _pid_alive(int(digits)):
            stale = os.path.join(parent, name)
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                try:
                    os.unlink(stale)  # a single file's temporary (write_text_atomic)
                except OSError:
                    pass


def temporary_sibling(dst: str) -> str:
    """A fresh, empty temporary folder next to ``dst`` for this process (leftovers of killed runs removed)."""
    parent, name = os.path.split(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}{TMP_MARK}"
    remove_stale_temporaries(parent, prefix)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_folder(tmp: str, dst: str) -> None:
    """Make the finished folder ``tmp`` appear at ``dst`` in one atomic step, replacing whatever DST held.

    New DST: a rename. Existing DST: ``renameat2(RENAME_EXCHANGE)`` swaps the two, then the old content (now at
    ``tmp``) is removed. Where the swap is unsupported, the old DST is first renamed to a temporary name (a kill in
    that window leaves DST missing but both folders complete, named by the ``sat-quant-tmp`` mark).
    """
    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
    elif exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = f"{tmp}-old"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except OSError:
            os.rename(old, dst)  # put the old folder back before reporting
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


@contextmanager
def staged_folder(dst: str, *, overwrite: bool, src: str = "", verb: str = "write") -> Iterator[str]:
    """``with staged_folder(dst, ...) as tmp:`` write a whole checkpoint folder into ``tmp``; on success it replaces
    ``dst`` atomically, on any failure ``tmp`` is removed and ``dst`` is left exactly as it was."""
    check_destination(dst, overwrite, src=src, verb=verb)
    tmp = ""
    try:
        tmp = temporary_sibling(dst)
        yield tmp
        publish_folder(tmp, dst)
    except BaseException as exc:
        if tmp:
            discard(tmp)
        cause = exc.__cause__
        if isinstance(exc, CheckpointWriteError) and isinstance(cause, write_errors()):
            raise write_failed(cause, dst, verb) from cause  # a save into tmp failed: name DST, not tmp
        if isinstance(exc, QuantError) or not isinstance(exc, write_errors()) or is_out_of_memory(exc):
            raise  # sat_quant's own errors say what they mean; an allocation failure is the caller's oom_guidance's
        raise write_failed(exc, dst, verb) from exc


def discard(tmp: str) -> None:
    """Remove a writer's own temporary folder after a failure (never anything else)."""
    if TMP_MARK in os.path.basename(tmp) or ".tmp-" in os.path.basename(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["fsync_dir", "fsync_tree", "write_text_atomic", "write_json_atomic", "exchange", "commit_iteration",
           "is_disk_full", "write_errors", "overlap", "check_destination", "check_writable", "existing_ancestor",
           "write_failed", "remove_stale_temporaries", "temporary_sibling", "publish_folder", "staged_folder",
           "discard", "TMP_MARK"]
