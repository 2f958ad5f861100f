"""Where the ledger lives: a SQLite file (a path, or ``sqlite:///path``) or a PostgreSQL server (a URL).

``storage.ledger`` accepts either.  A file path stays a :class:`~pathlib.Path` (resolved against the
config file's folder like every other path); a server is a :class:`LedgerURL`, normalised to the psycopg 3
driver, whose text form masks the password so that no log line, error message or ``triaged status``
output ever shows it.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator

#: Schemes naming a PostgreSQL server; every one is run with the psycopg 3 driver.
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+psycopg"})
_FORMS = "a file path, sqlite:///path or postgresql://user:password@host:port/database"


class LedgerURL:
    """A PostgreSQL ledger named by URL (``postgresql+psycopg://user:password@host:port/database``).

    Parameters
    ----------
    text
        ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://`` URL; query parameters
        (``?sslmode=require``) are kept.

    Raises
    ------
    ValueError
        Not a PostgreSQL URL, or it names no host or no database; the message never contains the password.
    """

    __slots__ = ("url", "host", "port", "database", "user", "_password")

    def __init__(self, text: str) -> None:
        parts = urllib.parse.urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in _POSTGRES_SCHEMES:
            raise ValueError(f"unsupported ledger URL scheme {scheme!r}; use {_FORMS}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError("the ledger URL has an invalid port") from exc
        database = urllib.parse.unquote(parts.path.lstrip("/"))
        if not parts.hostname:
            raise ValueError(f"the ledger URL names no host; use {_FORMS}")
        if not database or "/" in database:
            raise ValueError(f"the ledger URL names no database (or more than one path part); use {_FORMS}")
        self.host: str = parts.hostname
        self.port: int = port or 5432
        self.database: str = database
        self.user: str = urllib.parse.unquote(parts.username or "")
        self._password: str = urllib.parse.unquote(parts.password or "")
        self.url: str = urllib.parse.urlunsplit(("postgresql+psycopg", *parts[1:]))

    @property
    def masked(self) -> str:
        """The URL with the password replaced by ``***`` (what logs and messages show)."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, f"{parts.username}:***@{host}", *parts[2:]))

    @property
    def server(self) -> str:
        """``host:port/database`` (no user, no password), for one-line error messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.database}"

    def mask(self, text: str) -> str:
        """``text`` with every occurrence of the password replaced by ``***``."""
        if not self._password:
            return text
        out = text.replace(self._password, "***")
        quoted = urllib.parse.quote(self._password, safe="")
        return out.replace(quoted, "***") if quoted != self._password else out

    def exists(self) -> bool:
        """Always True: a server ledger is created (migrated) on first open, and reaching it is checked then.

        Lets code written for a ledger file (``if config.storage.ledger.exists()``) treat a server
        ledger as present; opening it reports an unreachable server as a one-line error.
        """
        return True

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"LedgerURL({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LedgerURL) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


def parse_ledger_location(value: Any) -> Path | LedgerURL:
    """``storage.ledger`` as given: a path (or ``sqlite:///path``) → Path, a PostgreSQL URL → :class:`LedgerURL`.

    Raises
    ------
    ValueError
        An unsupported URL scheme, an in-memory SQLite URL, or a malformed PostgreSQL URL.
    """
    if isinstance(value, LedgerURL | Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected {_FORMS}")
    text = value.strip()
    if not text:
        raise ValueError(f"the ledger location is empty; use {_FORMS}")
    if "://" not in text:
        return Path(text)
    scheme = text.partition("://")[0].lower()
    if scheme in ("sqlite", "sqlite+pysqlite"):
        # sqlite:///relative/file and sqlite:////absolute/file, as SQLAlchemy spells them.
        rest = text.partition("://")[2]
        if not rest.startswith("/") or rest in ("/", "/:memory:"):
            raise ValueError(f"a SQLite ledger URL must name a file (sqlite:///path); use {_FORMS}")
        return Path(rest[1:])
    return LedgerURL(text)


#: The type of ``storage.ledger``: validated by :func:`parse_ledger_location`; dumped to JSON as text (a
#: server URL masked, so a dumped config never carries the password).
LedgerLocation = Annotated[
    Path | LedgerURL, PlainValidator(parse_ledger_location), PlainSerializer(str, when_used="json")
]
