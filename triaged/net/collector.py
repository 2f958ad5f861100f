"""A small Storage SCP that keeps what it receives in memory: the destination PACS of ``triaged selftest``."""

from __future__ import annotations

import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triaged.net.tcp import set_nodelay


class ResultCollector:
    """Accept every storage SOP class on ``port`` as ``ae_title`` and collect the datasets."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        self.arrived = threading.Condition(self._lock)
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = 0
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._ae = ae
        self._bind = (host, port)
        self._server: Any = None

    def _on_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.arrived:
            self.received.append(ds)
            self.arrived.notify_all()
        return 0x0000

    def start(self) -> None:
        self._server = self._ae.start_server(
            self._bind, block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def of_study(self, study_uid: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.received if str(ds.get("StudyInstanceUID", "")) == study_uid]
