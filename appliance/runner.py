"""The served model: one backend instance, loaded on demand, used by one generation at a time.

llama.cpp and ONNX Runtime hold one KV cache per model, so generations take
turns; every request waits here for its turn. The power manager (idle and
wake) works through this class too, never on the backend directly.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator

from appliance.backends import Backend, BackendError, create_backend
from models import ModelEntry
from models.catalog import verify_package
from models.manifest import ManifestError


class ModelRunner:
    def __init__(
        self, entry: ModelEntry, threads: int, context_length: int, backend: Backend | None = None, provider: str = "auto"
    ):
        self.entry = entry
        self.backend = backend or create_backend(
            entry.format, entry.path, threads=threads, context_length=context_length, provider=provider
        )
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.load_count = 0
        # Called as hook() when a caller starts using the model and hook() again when it stops:
        # the power manager counts activity and wakes the box through these.
        self.on_begin: list = []
        self.on_end: list = []
        self._turn = threading.Lock()  # one generation at a time
        self._loading = threading.Lock()  # one load at a time, however many requests wait for it

    @property
    def name(self) -> str:
        return self.entry.name

    def answers_to(self, name: str | None) -> bool:
        return name is None or name == self.entry.name or name in self.entry.aliases

    @property
    def is_loaded(self) -> bool:
        return self.backend.is_loaded

    def ensure_loaded(self) -> Backend:
        with self._loading:
            if not self.backend.is_loaded:
                start = time.perf_counter()
                try:
                    self._verify_files()
                    self.backend.load()
                except BackendError as exc:
                    self.load_error = str(exc)
                    raise
                self.load_error = None
                self.load_seconds = time.perf_counter() - start
                self.load_count += 1
        return self.backend

    def _verify_files(self) -> None:
        try:
            verify_package(self.entry)
        except ManifestError as exc:
            raise BackendError(f"refusing to load {self.entry.name!r}: {exc}") from exc

    def unload(self) -> None:
        with self._turn, self._loading:
            self.backend.unload()

    def release_cache(self) -> None:
        with self._turn:
            self.backend.release_cache()

    @contextmanager
    def session(self) -> Iterator[Backend]:
        """The loaded backend, for this caller alone until the block ends."""
        for hook in self.on_begin:
            hook()
        try:
            with self._turn:
                yield self.ensure_loaded()
        finally:
            for hook in self.on_end:
                hook()

    def info(self) -> dict:
        info = {"id": self.entry.name, "format": self.entry.format, "path": str(self.entry.path),
                "loaded": self.is_loaded, "load_count": self.load_count}
        info.update(self.backend.info())
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.load_error:
            info["load_error"] = self.load_error
        return info
