"""Federation tests: every failing test gets the logs of the servers it started.

Synapse drops bad PDUs silently and answers 200, so its log is often the
only place that says why a test failed.
"""

import pytest

from tests.support.synapse import federating_server, running_logs, synapse_server

__all__ = ["federating_server", "synapse_server"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, text in running_logs():
            report.sections.append((f"log of {name}", text))
