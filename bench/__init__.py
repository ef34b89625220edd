"""Side-by-side benchmark of this homeserver against Synapse (client-server API, and
federation between the two with ``--federation``).

``python -m bench`` (or ``scripts/bench``) starts both servers on loopback, runs
the same verified workload against each, alternating per phase, and prints one
table. See docs/performance.md.

- ``bench.servers``: starting, stopping and measuring (/proc) both servers.
- ``bench.workload``: the phases, driven with aiohttp.
- ``bench.federation``: phase 12 (``--federation``), the two servers federating.
- ``bench.report``: the table and the JSON file.
"""
