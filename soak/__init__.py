"""The fault-injection suite (``make soak``; a short form runs inside ``make test``).

Each scenario runs a real ``triaged serve`` subprocess on a temporary state folder with fast timers and
checks the node's promises from the outside: the ledger (read-only SQLite), the spool files, a DCMTK
``storescp`` destination and what the senders were told.  See ``docs/security.md``.
"""
