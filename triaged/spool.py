"""The on-disk spool: received instances, quarantine, atomic durable writes.

Layout under the spool root::

    studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    quarantine/<UTC time>-<n>.dcm + .reason.txt                              refused datasets, kept for inspection
                                                                             (capped; only the reason when disk is low)
    work/<job id>/                                                           a job's masks, findings and outputs
    tmp/                                                                     partial writes (same file system)
    triaged.lock                                                             held by the running node (its PID inside)

Instances stay in ``studies/`` for the life of the study (a late instance re-opens a study, and the
next analysis needs every instance) until retention deletes a finished study's files and work folders
(:mod:`triaged.stages.retention`); the ledger, not the folder, records which job saw which instance.
Paths are built only from UIDs that passed :func:`validate_uid`, so a hostile UID cannot escape the root.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from triaged.domain import validate_uid
from triaged.errors import StorageError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StoredFile:
    """Where :meth:`Spool.store_instance` put a dataset."""

    path: str  # relative to the spool root, '/' separated
    size: int
    sha256: str
    already_present: bool  # a file with identical bytes was already there


class Spool:
    """Durable file storage for received instances.

    Parameters
    ----------
    root : Path
        The spool folder; created if missing.
    clean_partial : bool
        Remove partial writes left by a crashed process (the daemon does this at start).
    min_free_mb : int
        :meth:`store_instance` refuses (``StorageError``) when fewer MiB than this are free, so a
        full disk is reported to the sender as "out of resources" before a write half-fails;
        :meth:`quarantine` then keeps only the reason, not the refused bytes.
    quarantine_max_mb : int
        The most MiB ``quarantine/`` may hold; the oldest quarantined files are deleted first to stay
        under it (0: no cap).
    """

    def __init__(
        self, root: Path, min_free_mb: int = 0, *, clean_partial: bool = False, quarantine_max_mb: int = 0
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.quarantine_max_bytes = quarantine_max_mb * 1024 * 1024
        self._counter = itertools.count()
        self._lock = threading.Lock()
        #: One empty file per study retention is deleting now (``purging/<study UID>``): every process
        #: storing into the spool (the node and its receiver processes) refuses that study's instances.
        self._purging = root / "purging"
        for sub in ("studies", "quarantine", "tmp", "work", "purging"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if clean_partial:  # only the daemon at start: other processes may be writing right now
            self._clean_tmp()

    def _clean_tmp(self) -> None:
        # Partial writes of a crashed process were never acknowledged: the sender still has them; a
        # deletion a kill interrupted is finished by retention's next run, which marks the study again.
        for folder in ("tmp", "purging"):
            for leftover in (self.root / folder).iterdir():
                leftover.unlink(missing_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The relative path of an instance; every part must already be a validated UID."""
        for uid, kw in ((study_uid, "StudyInstanceUID"), (series_uid, "SeriesInstanceUID"), (sop_uid, "SOPInstanceUID")):
            validate_uid(uid, kw)
        return f"studies/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, rel_path: str) -> Path:
        """Absolute path of a spool-relative path, refusing anything that leaves the root."""
        path = (self.root / rel_path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"{rel_path!r} is outside the spool", retryable=False)
        return path

    def work_dir(self, job_id: int) -> Path:
        """Where a job's analysis results (masks, findings) and encoded outputs live."""
        return self.root / "work" / str(int(job_id))

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def store_instance(self, rel_path: str, data: bytes) -> StoredFile:
        """Write ``data`` to ``rel_path`` atomically and durably (temp file, fsync, rename, fsync dir).

        Returns once the bytes are on stable storage; raises :class:`StorageError` otherwise.  If a
        file with identical bytes is already there nothing is written (an idempotent re-send).
        """
        parts = rel_path.split("/")
        if len(parts) > 1 and parts[0] == "studies" and os.path.exists(self._purging / parts[1]):
            raise StorageError(f"study {parts[1]} is being deleted by retention; try again later")
        digest = hashlib.sha256(data).hexdigest()  # the one hash of these bytes (the ledger keeps it)
        final = self.root / rel_path
        try:
            try:  # one stat: a new instance's usual answer is ENOENT
                present = os.stat(final).st_size == len(data)
            except FileNotFoundError:
                present = False
            if present and hashlib.sha256(final.read_bytes()).hexdigest() == digest:
                return StoredFile(rel_path, len(data), digest, already_present=True)
            if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
                raise StorageError(
                    f"less than {self.min_free_bytes // 2**20} MiB free on {self.root}; refusing new instances"
                )
            self._write_atomic(final, data)
        except OSError as exc:
            raise StorageError(f"cannot write {rel_path}: {exc.strerror or exc}") from exc
        return StoredFile(rel_path, len(data), digest, already_present=False)

    def _write_atomic(self, final: Path, data: bytes) -> None:
        """Temp file in ``tmp/``, written and fsynced, renamed over ``final``, then ``final``'s folder fsynced.

        The folders are created only when the rename finds them missing (a study's first instance, or
        one arriving after retention removed them), not stat'ed or created for every instance.
        """
        tmp = os.path.join(self.root, "tmp", f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is on disk.
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def quarantine(self, data: bytes, reason: str, origin: str) -> Path | None:
        """Keep a refused dataset and why it was refused; never raises (best effort on a sick disk).

        The bytes are kept only while the disk stays above ``min_free_mb`` and they fit under
        ``quarantine_max_mb``; otherwise only the reason file is written (and the path returned is that
        file).  The oldest quarantined files are deleted first to stay under the cap.  Returns ``None``
        when nothing could be written.
        """
        folder = self.root / "quarantine"
        with self._lock:  # one quarantine at a time: the cap is checked against what is on disk
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            name = f"{stamp}-{next(self._counter)}"
            note = f"{origin}\n{reason}\n"
            dropped = self._why_not_keep(len(data) + len(note.encode("utf-8")))
            if dropped:
                note += f"bytes not kept: {dropped}\n"
                log.warning("refused dataset (%s) not kept in quarantine: %s", reason, dropped)
            size = len(note.encode("utf-8")) + (0 if dropped else len(data))
            try:
                self._prune_quarantine(size)
                if not dropped:
                    self._write_atomic(folder / f"{name}.dcm", data)
                (folder / f"{name}.reason.txt").write_text(note, encoding="utf-8")
            except OSError as exc:
                log.error("could not quarantine a refused dataset (%s): %s", reason, exc)
                return None
        return folder / (f"{name}.reason.txt" if dropped else f"{name}.dcm")

    def _why_not_keep(self, size: int) -> str:
        """Why a refused dataset of ``size`` bytes must not be kept ('' when it may be)."""
        if self.quarantine_max_bytes and size > self.quarantine_max_bytes:
            return f"{size} bytes exceed the quarantine cap of {self.quarantine_max_bytes // 2**20} MiB"
        try:
            low = bool(self.min_free_bytes) and self.free_bytes() - size < self.min_free_bytes
        except OSError:
            low = True
        if low:
            return f"less than {self.min_free_bytes // 2**20} MiB free on {self.root}"
        return ""

    def _prune_quarantine(self, incoming: int) -> None:
        """Delete the oldest quarantined files until ``incoming`` more bytes fit under the cap."""
        if not self.quarantine_max_bytes:
            return
        entries: dict[str, list[Path]] = {}
        total = 0
        for p in (self.root / "quarantine").iterdir():
            stem = p.name.removesuffix(".reason.txt").removesuffix(".dcm")
            entries.setdefault(stem, []).append(p)
            total += p.stat().st_size
        removed = 0
        for stem in sorted(entries):  # names start with a UTC time: oldest first
            if total + incoming <= self.quarantine_max_bytes:
                break
            for p in entries[stem]:
                total -= p.stat().st_size
                p.unlink(missing_ok=True)
            removed += 1
        if removed:
            cap_mb = self.quarantine_max_bytes // 2**20
            log.info("quarantine cap %d MiB: deleted the %d oldest entries", cap_mb, removed)

    def quarantined(self) -> list[tuple[Path, str]]:
        """Quarantined datasets with their reasons, oldest first.

        The path is that of the kept bytes (``.dcm``); it does not exist when only the reason was kept
        (disk below the watermark, or the dataset larger than the cap).
        """
        folder = self.root / "quarantine"
        stems = {p.name[: -len(".dcm")] for p in folder.glob("*.dcm")}
        stems |= {p.name[: -len(".reason.txt")] for p in folder.glob("*.reason.txt")}
        out = []
        for stem in sorted(stems):
            reason_file = folder / f"{stem}.reason.txt"
            reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.exists() else ""
            out.append((folder / f"{stem}.dcm", reason))
        return out

    def stored_paths(self) -> list[str]:
        """Every instance file under ``studies/`` as a relative path (for the start-up reconcile)."""
        base = self.root / "studies"
        return [p.relative_to(self.root).as_posix() for p in base.glob("*/*/*.dcm")]

    @contextmanager
    def purging(self, study_uid: str) -> Iterator[None]:
        """While retention deletes a study: :meth:`store_instance` refuses its instances (retryable).

        A sender storing into the study just then gets 0xA700 and sends again later, when the study is
        gone from the ledger's point of view and the instance opens it again, instead of having a file
        deleted that it was told is stored.

        The mark is a file (``purging/<study UID>``), so receiver processes (``listener.processes``) see
        it too; the node removes any left by a kill when it starts.
        """
        validate_uid(study_uid, "StudyInstanceUID")
        marker = self._purging / study_uid
        try:
            marker.touch()
        except OSError as exc:
            raise StorageError(f"cannot mark study {study_uid} for deletion: {exc.strerror or exc}") from exc
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def study_files(self, study_uid: str) -> list[tuple[str, int, float]]:
        """``(relative path, size, modification time)`` of every instance file of a study on disk."""
        validate_uid(study_uid, "StudyInstanceUID")
        out = []
        for p in (self.root / "studies" / study_uid).glob("*/*.dcm"):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    def study_names(self) -> set[str]:
        """Names of the folders under ``studies/`` (one per study with files)."""
        return {p.name for p in (self.root / "studies").iterdir() if p.is_dir()}

    def work_names(self) -> set[str]:
        """Names of the folders under ``work/`` (one per job with work files)."""
        return {p.name for p in (self.root / "work").iterdir() if p.is_dir()}

    def work_bytes(self, job_id: int) -> tuple[int, int]:
        """``(files, bytes)`` in a job's work folder (0, 0 when it has none)."""
        files = size = 0
        for dirpath, _, names in os.walk(self.work_dir(job_id)):
            for name in names:
                try:
                    size += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                files += 1
        return files, size

    def remove_files(self, rel_paths: Iterable[str]) -> tuple[int, int]:
        """Delete instance files (retention) and the study and series folders left empty.

        Returns ``(files, bytes)`` deleted; a file already gone is skipped.  Raises
        :class:`StorageError` when a file cannot be deleted (what was deleted before it stays deleted).
        """
        files = size = 0
        folders: set[Path] = set()
        for rel in rel_paths:
            path = self.absolute(rel)
            try:
                length = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot delete {rel}: {exc.strerror or exc}") from exc
            files += 1
            size += length
            folders.add(path.parent)
        studies = (self.root / "studies").resolve()
        for folder in sorted(folders | {f.parent for f in folders}, key=lambda f: len(f.parts), reverse=True):
            if folder.is_relative_to(studies) and folder != studies:
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty (an instance arrived since) or already gone
        return files, size

    def remove_work(self, job_id: int) -> tuple[int, int]:
        """Delete a job's work folder (masks, findings, encoded results); returns ``(files, bytes)``."""
        files, size = self.work_bytes(job_id)
        folder = self.work_dir(job_id)
        if folder.exists():
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                raise StorageError(f"cannot delete {folder}: {exc.strerror or exc}") from exc
        return files, size


LOCK_NAME = "triaged.lock"


#: What the lock file says while nodes of a PostgreSQL ledger hold it shared.
_SHARED_MARK = "shared"


class SpoolLock:
    """An exclusive lock on a spool folder, held by one node for its whole life.

    ``triaged serve`` takes it before anything touches the spool or the ledger (cleaning partial writes,
    the start-up reconcile, resuming jobs), so a second ``serve`` on the same state exits instead of
    deleting the running node's partial writes or re-queueing its running jobs.  The lock is a
    ``flock`` on ``<spool>/triaged.lock``: the kernel drops it when the process ends, however it ends,
    so a lock file left by a killed node never blocks a restart.  The file holds the PID of the holder.

    Several nodes sharing a PostgreSQL ledger share one spool (``shared=True``): each takes the lock
    shared, so they exclude only a node that wants the spool for itself (a SQLite ledger's node), and that
    node excludes them.  Nodes sharing a spool coordinate through the ledger (claims, leases, the leader).

    Parameters
    ----------
    root : Path
        The spool folder; created if missing.
    shared : bool
        Take the lock shared (nodes of a PostgreSQL ledger) rather than exclusive (a SQLite ledger).

    Raises
    ------
    StorageError
        Not retryable: another process holds the lock (the message names the lock file and that
        process's PID), or the lock file cannot be opened.
    """

    def __init__(self, root: Path, *, shared: bool = False) -> None:
        self.shared = shared
        self.path = root / LOCK_NAME
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)  # not inherited by worker processes
        except OSError as exc:
            raise StorageError(
                f"cannot open the lock file {self.path}: {exc.strerror or exc}", retryable=False
            ) from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError(
                    f"cannot lock {self.path}: {exc.strerror or exc}", retryable=False
                ) from exc
            if shared:
                raise StorageError(
                    f"{self.path} is locked by a triaged node on a SQLite ledger (PID {holder}) using the same "
                    "spool; only nodes sharing a PostgreSQL ledger may share a spool (nothing was changed)",
                    retryable=False,
                ) from exc
            who = "triaged nodes of a PostgreSQL ledger" if holder == _SHARED_MARK else f"another triaged node (PID {holder})"
            raise StorageError(
                f"{self.path} is locked by {who} using the same spool; stop it first (nothing was changed)",
                retryable=False,
            ) from exc
        if shared:  # every holder writes the same text: no PID, there may be many
            os.pwrite(fd, f"{_SHARED_MARK}\n".encode("ascii"), 0)
            os.ftruncate(fd, len(_SHARED_MARK) + 1)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (the process ending drops it too); the file stays, harmless."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
