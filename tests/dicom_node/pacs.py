"""A loopback PACS: a pynetdicom Storage SCP that records what it receives."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from tests.conftest import free_port


@dataclass
class LoopbackPACS:
    """Stores received datasets in memory; ``statuses`` forces answers for the next stores."""

    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    received: list[Dataset] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    _server: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def spec(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            if self.statuses:
                return self.statuses.pop(0)
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
        return 0x0000

    def start(self) -> LoopbackPACS:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

    def uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received]
