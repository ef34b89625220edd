"""Starting the real server as a subprocess on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, server_name: str | None = None, **overrides: Any) -> Path:
    """Generate a config with the real CLI, then layer ``overrides`` in a second file."""
    port = free_port()
    config_path = directory / "homeserver.yaml"
    subprocess.run(
        [sys.executable, "-m", "homeserver.app", "generate-config",
         "--server-name", server_name or f"127.0.0.1:{port}", "--config-path", str(config_path),
         "--port", str(port)],
        check=True, capture_output=True, cwd=REPO,
    )
    if overrides:
        (directory / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return config_path


class RunningServer:
    def __init__(self, config_paths: list[Path], log_path: Path) -> None:
        self.config_paths = config_paths
        self.log_path = log_path
        merged: dict[str, Any] = {}
        for p in config_paths:
            merged.update(yaml.safe_load(p.read_text()))
        listener = merged["listeners"][0]
        scheme = "https" if listener.get("tls") else "http"
        self.port = listener["port"]
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        self.server_name = merged["server_name"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "RunningServer":
        args = [sys.executable, "-m", "homeserver.app", "run"]
        for p in self.config_paths:
            args += ["--config-path", str(p)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, cwd=REPO,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def start_server(directory: Path, server_name: str | None = None, **overrides: Any) -> RunningServer:
    config = write_config(directory, server_name, **overrides)
    paths = [config] + ([directory / "overrides.yaml"] if overrides else [])
    return RunningServer(paths, directory / "server.log").start()
