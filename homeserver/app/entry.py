"""The ``homeserver`` command's entry point (also ``python -m homeserver.app``).

Kept free of imports beyond the standard library's ``os`` and ``sys``: what it does
has to happen before Twisted is imported.
"""

import os
import sys


def main() -> int:
    # A server process holds every module's code for its whole life; their
    # docstrings (about 2 MiB resident) are never read. Running ``run`` under
    # ``-OO`` drops them (and ``assert``s, which here only narrow types), and
    # ``-X no_debug_ranges`` the column positions of every instruction (0.4 MiB;
    # tracebacks lose their ^^^ markers, not their lines).
    # HOMESERVER_KEEP_DOCSTRINGS=1 keeps both. The process is replaced before
    # anything is imported, so its PID stays the same.
    if (
        len(sys.argv) > 1
        and sys.argv[1] == "run"
        and sys.flags.optimize < 2
        and not os.environ.get("HOMESERVER_KEEP_DOCSTRINGS")
    ):
        os.execv(
            sys.executable,
            [sys.executable, "-OO", "-X", "no_debug_ranges", *sys.orig_argv[1:]],
        )

    from homeserver.app.lazy_modules import defer_unused_imports

    defer_unused_imports()  # before anything imports Twisted
    from homeserver.app.cli import main as cli_main

    return cli_main()
