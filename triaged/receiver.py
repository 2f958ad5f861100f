"""One receiver process of the node (``listener.processes`` > 1): the composition root of a receiver.

Started by :class:`~triaged.net.receivers.ReceiverPool` as ``python -m triaged.receiver``; never by hand.
It builds what the C-STORE, C-ECHO and C-FIND handlers need (its own ledger connection and spool on the
node's files, the :class:`~triaged.net.scp.StoreService`, the worklist when ``worklist.c_find`` is on)
and serves the parent's listening socket until the parent says stop.  It imports no torch and starts no
worker, scheduler or timers: the parent does all of that.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

from pydicom.dataset import Dataset

from triaged.config import Config
from triaged.domain import WorklistRow
from triaged.ledger import Ledger
from triaged.net.receivers import ChildChannel, serve_receiver
from triaged.net.scp import Listener, StoreService
from triaged.net.worklist import WorklistFind
from triaged.spool import Spool


class _LazyWorklist:
    """The worklist stage, imported when first needed: ``triaged.stages`` costs seconds of imports."""

    def __init__(self, ledger: Ledger, spool: Spool, config: Callable[[], Config]) -> None:
        self._args = (ledger, spool, config)
        self._lock = threading.Lock()
        self._worklist: Any = None

    def load(self) -> Any:
        with self._lock:
            if self._worklist is None:
                from triaged.stages.worklist import Worklist

                self._worklist = Worklist(*self._args)
            return self._worklist

    def rows(self) -> list[WorklistRow]:
        return cast(list[WorklistRow], self.load().rows())

    def study_header(self, study_uid: str) -> Dataset | None:
        return cast(Dataset | None, self.load().study_header(study_uid))


def build_receiver(
    channel: ChildChannel,
) -> Callable[[Config, Config], tuple[Any, Callable[[Config], None], Callable[[], None]]]:
    """What :func:`~triaged.net.receivers.serve_receiver` starts the receiver with."""

    def start(
        start_config: Config, current: Config
    ) -> tuple[Any, Callable[[Config], None], Callable[[], None]]:
        config = [current]
        ledger = Ledger(start_config.storage.ledger)
        try:
            spool = Spool(
                start_config.storage.spool,
                start_config.storage.min_free_mb,
                clean_partial=False,  # the other receivers are writing: only the node cleans, at its start
                quarantine_max_mb=start_config.storage.quarantine_max_mb,
            )
            # The AE (title, storage contexts, TLS) comes from the start configuration, as in one process;
            # the access rules, limits and timeouts from the configuration in force.
            service = StoreService(spool, ledger, start_config.listener, on_stored=channel.stored)
            service.reload(current.listener)
            find = None
            if start_config.worklist.c_find:
                worklist = _LazyWorklist(ledger, spool, lambda: config[0])
                find = WorklistFind(worklist.rows, worklist.study_header, recorder=ledger)
                # imported beside the first stores rather than before the receiver serves (seconds)
                threading.Thread(target=worklist.load, name="triaged-receiver-worklist", daemon=True).start()
            listener = Listener(start_config.listener, service, find)
        except BaseException:
            ledger.close()
            raise

        def reload(new: Config) -> None:
            config[0] = new
            service.reload(new.listener)

        return listener, reload, ledger.close

    return start


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m triaged.receiver", description=__doc__)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = ChildChannel(args.control_fd, args.events_fd, args.parent)
    listen_socket = socket.socket(fileno=args.listen_fd)
    code = serve_receiver(channel, listen_socket, build_receiver(channel))
    logging.shutdown()
    # Drained and closed: nothing is left to wait for (a lingering pynetdicom thread would hold the exit up).
    os._exit(code)


if __name__ == "__main__":
    main()
