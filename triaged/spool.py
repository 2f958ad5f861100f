"""The on-disk spool: received instances, quarantine, atomic durable writes.

Layout under the spool root::

    studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    quarantine/<UTC time>-<n>.dcm + .reason.txt                              refused datasets, kept for inspection
    work/<job id>/                                                           a job's masks, findings and outputs
    tmp/                                                                     partial writes (same file system)

Instances stay in ``studies/`` for the life of the study (a late instance re-opens a study, and the
next analysis needs every instance); the ledger, not the folder, records which job saw which instance.
Paths are built only from UIDs that passed :func:`validate_uid`, so a hostile UID cannot escape the root.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import threading
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
        full disk is reported to the sender as "out of resources" before a write half-fails.
    """

    def __init__(self, root: Path, min_free_mb: int = 0, *, clean_partial: bool = False) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._counter = itertools.count()
        self._lock = threading.Lock()
        for sub in ("studies", "quarantine", "tmp", "work"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if clean_partial:  # only the daemon at start: other processes may be writing right now
            self._clean_tmp()

    def _clean_tmp(self) -> None:
        # Partial writes of a crashed process were never acknowledged: the sender still has them.
        for leftover in (self.root / "tmp").iterdir():
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
        digest = hashlib.sha256(data).hexdigest()
        final = self.root / rel_path
        try:
            if final.exists() and final.stat().st_size == len(data):
                if hashlib.sha256(final.read_bytes()).hexdigest() == digest:
                    return StoredFile(rel_path, len(data), digest, already_present=True)
            if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
                raise StorageError(
                    f"less than {self.min_free_bytes // 2**20} MiB free on {self.root}; refusing new instances"
                )
            final.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomic(final, data)
        except OSError as exc:
            raise StorageError(f"cannot write {rel_path}: {exc.strerror or exc}") from exc
        return StoredFile(rel_path, len(data), digest, already_present=False)

    def _write_atomic(self, final: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}.part"
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
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is on disk.
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def quarantine(self, data: bytes, reason: str, origin: str) -> Path | None:
        """Keep a refused dataset and why it was refused; never raises (best effort on a sick disk)."""
        with self._lock:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            name = f"{stamp}-{next(self._counter)}"
        folder = self.root / "quarantine"
        try:
            self._write_atomic(folder / f"{name}.dcm", data)
            (folder / f"{name}.reason.txt").write_text(f"{origin}\n{reason}\n", encoding="utf-8")
        except OSError as exc:
            log.error("could not quarantine a refused dataset (%s): %s", reason, exc)
            return None
        return folder / f"{name}.dcm"

    def quarantined(self) -> list[tuple[Path, str]]:
        """Quarantined files with their reasons, oldest first."""
        out = []
        for p in sorted((self.root / "quarantine").glob("*.dcm")):
            reason_file = p.with_name(p.name[: -len(".dcm")] + ".reason.txt")
            reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.exists() else ""
            out.append((p, reason))
        return out

    def stored_paths(self) -> list[str]:
        """Every instance file under ``studies/`` as a relative path (for the start-up reconcile)."""
        base = self.root / "studies"
        return [p.relative_to(self.root).as_posix() for p in base.glob("*/*/*.dcm")]

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's files (retention); the UID is validated first."""
        validate_uid(study_uid, "StudyInstanceUID")
        shutil.rmtree(self.root / "studies" / study_uid, ignore_errors=True)
