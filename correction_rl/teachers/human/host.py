"""Exactly one web app per queue file, served by whichever process holds the queue's lock.

Why: in the Ray modes every teacher worker (and, with ``eval.teacher: run``, every rollout worker)
builds its own ``HumanTeacher`` over the same SQLite file. They must share one page and one port,
and the page must come back when the process serving it dies (Ray restarts actors, but not
necessarily the one that served, and not at once).

How: an exclusive OS lock (``flock``) on ``<queue file>.lock`` decides who serves. The holder
starts the app and writes its address to ``<queue file>.url``; every other process retries the
lock every ``retry_s`` seconds in a daemon thread. The kernel drops the lock the moment its
holder exits — crash, ``SIGKILL`` or actor restart alike — so the next retry in another process
(or in the restarted one) takes over the same host and port. No heartbeat, no stale-lock
cleanup: a lock on a local file cannot outlive its process. This is also why the queue file and
all processes that serve it must be on one node (``flock`` over NFS is not reliable, and SQLite
over NFS is not safe; docs/human-teachers.md).

The lock file descriptor is close-on-exec, but a child *forked* without exec would share the
lock; nothing in the teacher workers forks.

Within one process the host is shared per queue file (``acquire_host``), reference-counted, so
a process that builds several human teachers (held-out evaluation builds one per evaluation)
runs at most one lock-retry thread and one server.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Callable

from correction_rl.teachers.human.app import Server, serve

_REGISTRY: dict[str, "AppHost"] = {}
_REGISTRY_LOCK = threading.Lock()


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def url_path(db: Path) -> Path:
    """Where the serving process writes the app's address (read it when ``teacher.human.port`` is 0)."""
    return db.with_name(db.name + ".url")


class AppHost:
    """Serves ``make_app()`` on ``host:port`` while this object holds the queue file's lock.

    ``start()`` tries the lock once, serving at once if it gets it (a bind error then raises, so
    a taken port fails the run at start-up, not silently later); otherwise a daemon thread keeps
    trying every ``retry_s`` seconds. ``close()`` stops serving and releases the lock, so another
    process takes over within its own ``retry_s``."""

    def __init__(self, db: Path, make_app: Callable[[], object], host: str = "127.0.0.1", port: int = 0,
                 retry_s: float = 2.0, announce: Callable[[str], None] | None = None) -> None:
        if retry_s <= 0:
            raise ValueError(f"retry_s={retry_s}: must be > 0")
        self.db = Path(db).resolve()  # also this process's registry key (``acquire_host``)
        self.make_app = make_app
        self.host, self.port = host, port
        self.retry_s = float(retry_s)
        self.announce = announce
        self.server: Server | None = None
        self.last_error: str | None = None
        """Why the last takeover attempt failed to serve (e.g. the port is taken), if it did."""
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.refs = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self.server is not None

    @property
    def url(self) -> str | None:
        """The app's address: ours when serving, else the one the serving process published."""
        if self.server is not None:
            return self.server.url
        try:
            return url_path(self.db).read_text().strip() or None
        except OSError:
            return None

    # -- lock and serve ------------------------------------------------------------------------

    def _try_serve(self, raise_on_error: bool) -> bool:
        with self._mutex:
            if self.server is not None:
                return True
            if self._stop.is_set():
                return False
            fd = os.open(lock_path(self.db), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                server = serve(self.make_app(), self.host, self.port)
            except Exception as exc:
                fcntl.flock(fd, fcntl.LOCK_UN)  # let a process that can bind serve instead
                os.close(fd)
                if raise_on_error:
                    raise
                if str(exc) != self.last_error:  # say it once, not every retry
                    print(f"human teacher app: taking over failed ({exc}); retrying every {self.retry_s:g} s",
                          flush=True)
                self.last_error = str(exc)
                return False
            self._fd, self.server, self.last_error = fd, server, None
            tmp = url_path(self.db).with_suffix(".url.tmp")
            tmp.write_text(server.url + "\n")
            os.replace(tmp, url_path(self.db))
        if self.announce is not None:
            self.announce(server.url)
        return True

    def _retry(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._try_serve(raise_on_error=False):
                return

    def start(self) -> "AppHost":
        if not self._try_serve(raise_on_error=True):
            self._thread = threading.Thread(target=self._retry, name="human-teacher-app-lock", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry_s + 30.0)  # bounded: a takeover in progress finishes first
        with self._mutex:
            if self.server is not None:
                self.server.stop()
                self.server = None
                try:
                    url_path(self.db).unlink()
                except OSError:
                    pass
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


class HostLease:
    """One user's share of a process-wide ``AppHost`` (what a ``HumanTeacher`` holds)."""

    def __init__(self, host: AppHost) -> None:
        self.host = host
        self._released = False

    @property
    def url(self) -> str | None:
        return self.host.url

    @property
    def serving(self) -> bool:
        return self.host.serving

    def stop(self) -> None:
        if self._released:
            return
        self._released = True
        with _REGISTRY_LOCK:
            self.host.refs -= 1
            last = self.host.refs == 0
            if last:
                _REGISTRY.pop(str(self.host.db), None)
        if last:
            self.host.close()


def acquire_host(db: Path, make_app: Callable[[], object], host: str = "127.0.0.1", port: int = 0,
                 retry_s: float = 2.0, announce: Callable[[str], None] | None = None) -> HostLease:
    """This process's host for queue file ``db`` (started on first use), as a lease to ``stop()``."""
    key = str(Path(db).resolve())
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(key)
        if existing is None:
            existing = AppHost(Path(db), make_app, host, port, retry_s, announce).start()
            _REGISTRY[key] = existing
        elif (existing.host, existing.port) != (host, port):
            raise ValueError(f"human teacher app for {db}: already set up on {existing.host}:{existing.port} "
                             f"in this process, not {host}:{port}")
        existing.refs += 1
        return HostLease(existing)
