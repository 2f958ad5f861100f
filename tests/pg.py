"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temp folder, no system service.

Debian's ``postgresql`` package puts its server binaries under ``/usr/lib/postgresql/<version>/bin``
(not on PATH); the newest there is used, else ``initdb``/``pg_ctl`` on PATH.  The cluster listens on
127.0.0.1 on the given port (and a Unix socket in its own folder), trusts every local connection, and
runs with ``fsync=off``: it lives for one pytest session and is deleted afterwards.

The server refuses to run as root, so when the tests run as root the cluster's folder is handed to
``nobody`` and every server command runs through ``runuser -u nobody``.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

#: The database role the tests connect as (the cluster's superuser, created by initdb).
USER = "triaged"
_UNPRIVILEGED = "nobody"


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest Debian version first), or None."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)],
        reverse=True,
    )
    if versions:
        return versions[0]
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    return None


class PostgresCluster:
    """A running throwaway cluster; :meth:`new_database` hands out an empty database per test.

    Parameters
    ----------
    bindir
        Where ``initdb`` and ``pg_ctl`` are (:func:`postgres_bin`).
    port
        A free TCP port on 127.0.0.1.
    """

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="triaged-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_root = os.geteuid() == 0
        self._names = itertools.count(1)
        self._ledger_db: str | None = None
        if self._as_root:
            # mkdtemp's folder is 0700 and ours: the server's user must own it (/tmp itself is world-searchable).
            user = pwd.getpwnam(_UNPRIVILEGED)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        try:
            self._run("initdb", "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync", "-D", str(self.data))
            options = (
                f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start"
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", _UNPRIVILEGED, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """A ``postgresql://`` URL of ``database`` (a password is ignored by the trusting server)."""
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # our own generated name
        return self.url(name)

    def ledger_database(self) -> str:
        """The URL of this cluster's ledger database, emptied: every table but ``alembic_version`` truncated.

        Creating and migrating a database per test costs a second or more; the first ledger opened
        migrates this one, later tests find it at the newest revision and empty (ids restart at 1).
        """
        if self._ledger_db is None:
            self._ledger_db = self.new_database()
            return self._ledger_db
        with psycopg.connect(self._ledger_db, autocommit=True) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            ]
            if tables:
                names = ", ".join(f'"{t}"' for t in tables)
                conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")  # type: ignore[arg-type]
        return self._ledger_db

    def stop(self) -> None:
        """Stop the server (immediate: nothing in it is worth a checkpoint) and delete its folder."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def both_dialects(metafunc: pytest.Metafunc, *, sqlite_only_with: tuple[str, ...] = ()) -> None:
    """Run every test of a module that uses ``ledger_location`` on SQLite and on PostgreSQL.

    Call from a test module's ``pytest_generate_tests``.  Tests that also use one of ``sqlite_only_with``
    (fixtures that read the SQLite file itself) run on SQLite only.
    """
    if "ledger_location" not in metafunc.fixturenames:
        return
    sqlite_only = any(name in metafunc.fixturenames for name in sqlite_only_with)
    metafunc.parametrize(
        "ledger_location", ["sqlite"] if sqlite_only else ["sqlite", "postgresql"], indirect=True
    )
