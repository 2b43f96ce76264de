"""The plain-HTTP front door: waitress, holding many connections and never shut by idle ones.

waitress stops accepting at its ``connection_limit`` and closes an idle channel only after
``channel_timeout``, so a few hundred sockets that send nothing (or half a request) locked every
client out. This server keeps accepting: at the limit it closes the connection that has been idle
longest (no request in progress: silent, keep-alive, or still sending its headers or body) to make
room. A connection whose request is running, a streaming answer included, is never closed this way,
and waitress's ``client_disconnected`` still tells a generation that its client left.

Its workers are handed tasks last-idle-first: the thread that finished most recently takes the next
task, so the threads that run requests are about as many as the requests in flight at the busiest
moment. waitress wakes the thread idle longest, which rotates every task through all of its
parallel + queue_size + 4 threads; each then keeps the native memory a request left it (touched stack
pages, glibc's per-thread cache of freed blocks), and the process's RSS crept up by about 9 MiB over
a 30-minute soak with 16 clients (bench/results/soak).
"""

from __future__ import annotations

import logging
import resource
import threading
import time

from waitress.adjustments import Adjustments
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger("appliance")

FILES_PER_CONNECTION = 3  # its socket, and behind TLS the relay's two
SPARE_FILES = 256  # the database, the runner's pipe, the model files, logs


PROBES = frozenset({"/healthz", "/readyz"})


def is_probe(task) -> bool:
    """Whether a waitress task (a channel whose first request is parsed) is a health probe."""
    requests = getattr(task, "requests", None)
    return bool(requests) and requests[0].command == "GET" and requests[0].path in PROBES


class LastIdleFirstDispatcher(ThreadedTaskDispatcher):
    """waitress's thread pool, handing each task to the worker that went idle last.

    Tasks start in the order they came, except health probes (GET /healthz, /readyz), which go to the
    front: when every thread is busy (a full queue holds all but 4) and a burst of requests waits to be
    told 429, a probe would otherwise wait behind all of them. Each idle worker waits on a condition of
    its own (all on the pool's lock), kept on a stack.
    """

    def __init__(self):
        super().__init__()
        self.idle: list[threading.Condition] = []  # the idle workers' conditions, the last one idle on top

    def handler_thread(self, thread_no):
        ready = threading.Condition(self.lock)
        while True:
            with self.lock:
                while not self.queue and self.stop_count == 0:
                    self.active_count -= 1
                    self.idle.append(ready)
                    ready.wait()  # whoever notifies has taken it off the stack
                    self.active_count += 1
                if self.stop_count > 0:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    break
                task = self.queue.popleft()
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)

    def add_task(self, task):
        with self.lock:
            if is_probe(task):  # a health probe must not wait behind a burst of other requests
                self.queue.appendleft(task)
            else:
                self.queue.append(task)
            if self.idle:
                self.idle.pop().notify()
            queue_size = len(self.queue)
            idle_threads = len(self.threads) - self.stop_count - self.active_count
            if queue_size > idle_threads:
                self.queue_logger.warning("Task queue depth is %d", queue_size - idle_threads)

    def set_thread_count(self, count):
        super().set_thread_count(count)
        with self.lock:
            if self.stop_count > 0:  # the idle ones must wake to see they are to stop
                for ready in self.idle:
                    ready.notify()
                self.idle.clear()


class FrontDoor(TcpWSGIServer):
    """waitress's TCP server, evicting the longest-idle connection instead of refusing new ones."""

    evictions = 0

    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_channel_cleanup:  # waitress's own sweep of channels idle past channel_timeout
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting

    def handle_accept(self) -> None:
        if len(self.active_channels) >= self.adj.connection_limit:
            self._evict_longest_idle()
        super().handle_accept()

    def _evict_longest_idle(self) -> None:
        idle = [channel for channel in self.active_channels.values() if not channel.requests]
        if not idle:  # every connection has a request in progress: real load, which admission answers
            return
        oldest = min(idle, key=lambda channel: channel.last_activity)
        self.evictions += 1
        oldest.handle_close()


def create_front_door(app, host: str, port: int, threads: int, max_connections: int, max_body: int) -> FrontDoor:
    """The server for ``app``, listening on host:port, with ``threads`` workers and room for ``max_connections``.

    waitress reads a whole body (to a temporary file past 512 KB) before the app or its key check sees it, up to
    1 GiB by default: anyone could make the box buffer that much per connection. A body declared larger than
    twice ``max_body`` is turned away as soon as its headers arrive; one between the two still reaches the app,
    whose 413 says which setting to raise, in the API's error shape."""
    adj = Adjustments(
        host=host, port=port, threads=threads, connection_limit=max_connections,
        max_request_body_size=2 * max_body + 65536,
        asyncore_use_poll=True,  # select() cannot watch a descriptor numbered past 1024
        # Lets waitress notice a client that hangs up while its request runs,
        # so a dropped stream stops generating (environ["waitress.client_disconnected"]).
        channel_request_lookahead=1,
        ident="appliance", clear_untrusted_proxy_headers=True,
    )
    dispatcher = LastIdleFirstDispatcher()
    dispatcher.set_thread_count(adj.threads)
    return FrontDoor(app, map={}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])


def allow_open_files(connections: int) -> int:
    """Raise this process's open-file limit for ``connections``; returns how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * FILES_PER_CONNECTION + SPARE_FILES
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    fits = max(1, (soft - SPARE_FILES) // FILES_PER_CONNECTION)
    if fits < connections:
        log.warning("the open-file limit (%d) holds %d connections, not max_connections=%d: raise it "
                    "(LimitNOFILE= in the systemd unit, ulimit -n)", soft, fits, connections)
    return min(fits, connections)
