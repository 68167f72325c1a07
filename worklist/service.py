"""`cxr worklist`: the store, the Kafka consumer that feeds it and the HTTP server, run together.

The consumer and the web server are threads of one process sharing one store; stopping sets an event the
consumer checks between polls and asks uvicorn to finish its requests. The demo runs the same object.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from streaming.settings import Settings
from worklist.api import accepted_hosts, create_app
from worklist.consumer import ResultsConsumer
from worklist.events import NormalLabels
from worklist.ordering import MaxWait
from worklist.store import WorklistStore

log = logging.getLogger("cxr.worklist")


class WorklistService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = WorklistStore(settings.worklist_db, MaxWait.from_settings(settings))
        self.consumer = ResultsConsumer(settings, self.store, NormalLabels.of_bundle(settings.model_bundle))
        self.app = create_app(self.store, settings, self.consumer.status)
        self._stop = threading.Event()
        self._socket = socket.create_server((settings.worklist_host, settings.worklist_port), reuse_port=False)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = self.settings.worklist_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{shown}:{self.port}/"

    def start(self) -> WorklistService:
        if accepted_hosts(self.settings) is None:
            log.warning(
                "the worklist listens on %s and answers to any host name: another site could reach it through DNS"
                " rebinding; set CXR_WORKLIST_ALLOWED_HOSTS to the names readers use",
                self.settings.worklist_host or "every interface",
            )
        self._threads = [
            threading.Thread(target=self.consumer.run, args=(self._stop,), name="worklist-consumer", daemon=True),
            threading.Thread(target=self._serve, name="worklist-http", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _serve(self) -> None:
        self._server.run(sockets=[self._socket])

    @property
    def running(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self.app.state.events.close()  # open pages' event streams end now, not at uvicorn's graceful timeout
        self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout_s)
        self._socket.close()
        self.store.close()
