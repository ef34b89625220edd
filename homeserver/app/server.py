"""Start-up and clean shutdown of a homeserver process."""

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

from crypto.keys import generate_signing_key, read_signing_keys, write_signing_keys
from homeserver.app.listeners import start_listeners
from homeserver.config import HomeserverConfig
from homeserver.http.server import RequestTracker
from homeserver.services.rooms.sender import TXN_MEMORY_MS
from homeserver.services.server import HomeServer
from storage import Database, DatabaseConfig

logger = logging.getLogger(__name__)

# How long shutdown waits for requests in flight before closing anyway.
SHUTDOWN_GRACE_SECONDS = 10.0


def setup_logging(config: HomeserverConfig) -> None:
    path = config.get("log_config")
    if path:
        # Imported here (it brings logging.handlers): only when a log config is given.
        from logging.config import dictConfig

        import yaml

        with open(path) as f:
            dictConfig(yaml.safe_load(f))
    else:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def load_or_create_signing_keys(path: str) -> list[Any]:
    if not Path(path).exists():
        logger.info("no signing key at %s: generating one", path)
        write_signing_keys(path, [generate_signing_key()])
    return read_signing_keys(path)


# mallopt(3) parameter: the most malloc arenas glibc creates (M_ARENA_MAX).
_M_ARENA_MAX = -8
# Arenas for the whole process. glibc's default is 8 per core: a thread that
# finds the arenas in use gets one of its own, which keeps the memory that
# thread freed. Besides the reactor thread there are only the database and
# media worker threads; 2 arenas saved about 2 MiB of peak RSS in the benchmark
# with no measurable cost (docs/performance.md, "Memory (RSS)").
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas, before any thread starts (elsewhere a no-op).

    A ``MALLOC_ARENA_MAX`` in the environment wins: glibc has applied it already.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes  # already loaded by Twisted

        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)
    except (ImportError, AttributeError, OSError):
        pass


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc; elsewhere a no-op).

    Start-up (config, schema, imports) frees about a MiB of C heap that glibc
    would otherwise keep mapped while the server idles.
    """
    try:
        import ctypes  # already loaded by Twisted

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, AttributeError, OSError):
        pass


def run(config: HomeserverConfig) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT."""
    from twisted.internet import defer, reactor

    started = time.monotonic()
    limit_malloc_arenas()  # before the database starts its threads
    setup_logging(config)
    signing_keys = load_or_create_signing_keys(config["signing_key_path"])
    Path(config["media_store_path"]).mkdir(parents=True, exist_ok=True)
    database = Database(reactor, DatabaseConfig(config.database_engine, config.database_args))
    database.open()
    max_stream = database.run_blocking(
        lambda txn: txn.execute("SELECT MAX(stream_ordering) FROM events").fetchone()[0] or 0
    )
    hs = HomeServer(config, reactor, database, signing_keys, max_stream)
    hs.room_sender.load_recent_txn_ids(database.run_blocking(
        hs.events_store.recent_txn_ids_txn, hs.clock.time_msec() - TXN_MEMORY_MS))
    tracker = RequestTracker()
    ports = start_listeners(hs, reactor, tracker)
    # Background jobs: media retention and expiry, batched push-count writes.
    hs.media.start()
    hs.push.start()
    pid_file = config.get("pid_file")
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")

    async def shutdown() -> None:
        logger.info("shutting down: no new connections, finishing requests in flight")
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        idle = tracker.wait_idle()
        timeout = reactor.callLater(SHUTDOWN_GRACE_SECONDS, idle.cancel)
        try:
            await idle
        except defer.CancelledError:
            logger.warning("%d requests still running after %.0fs", tracker.in_flight,
                           SHUTDOWN_GRACE_SECONDS)
        else:
            timeout.cancel()
        hs.federation_sender.shutdown()  # positions are durable; nothing to flush
        await hs.federation_client.close()
        for service in (hs.presence, hs.typing):
            service.shutdown()
        hs.media.stop()
        await hs.push.flushed()  # notification counts computed so far reach the database
        await database.close()
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)
        logger.info("shutdown complete")

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(shutdown())
    )
    reactor.callWhenRunning(
        lambda: logger.info(
            "%s ready in %.2fs", config.server_name, time.monotonic() - started
        )
    )
    reactor.callWhenRunning(release_free_heap)
    # What start-up made (modules, config, the caches loaded so far) lives as long
    # as the process: keep it out of every later garbage collection's scan (a
    # full collection then takes about a third less, tens of ms fewer pauses).
    gc.collect()
    gc.freeze()
    reactor.run()
    return 0
