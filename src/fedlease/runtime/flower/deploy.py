"""``fedlease deploy``: a real Flower deployment on this machine, on loopback, in one command.

It starts a SuperLink and one SuperNode per client (``partition-id`` i), each a separate process group bound
to 127.0.0.1, optionally with TLS (a throw-away CA and server certificate are generated), submits the run
with ``flwr run --stream``, streams its log, and stops everything it started, whatever happens. The same
ServerApp and ClientApp run on real machines: see docs/deployment.md for the commands to run there.

Each SuperNode runs with ``--isolation process`` next to a ``fedlease executor`` (one long-lived process that
runs the node's ClientApp tasks, so the model is loaded once per node; ``executor="flower"`` keeps Flower's
per-message processes), and keeps its client's own state in ``<workdir>/state/client-<i>`` (node config
``state-dir``), so a restarted node continues where it was.

Telemetry and update checks are off, and the SuperLink never installs dependencies at run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from fedlease.config import RunConfig
from fedlease.errors import FedleaseError
from fedlease.runtime.flower.run_config import to_run_config

ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "fedlease-loopback"
EXECUTORS = ("fedlease", "flower")
HEALTH_TIMEOUT = 60.0


class DeploymentError(FedleaseError):
    """A SuperLink or SuperNode that did not come up, or a run that failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value) -> str:
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


def node_config_arg(values: dict[str, object]) -> str:
    """``--node-config`` text: space-separated key=value, strings quoted (paths may hold spaces)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_app(folder: Path) -> Path:
    """A minimal Flower App folder naming fedlease's ServerApp and ClientApp (the package must be installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {toml_value(v)}" for k, v in to_run_config(RunConfig()).items())
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlease-app"
version = "0.1.0"
description = "fedlease's ServerApp and ClientApp (the fedlease package must be installed where they run)"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "fedlease"

[tool.flwr.app.components]
serverapp = "fedlease.runtime.flower.server_app:app"
clientapp = "fedlease.runtime.flower.client_app:app"

[tool.flwr.app.config]
{config}
""", encoding="utf-8")
    return folder


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost / ::1 (ca.crt, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=7)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlease loopback test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


class LoopbackDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own process group, stopped on exit."""

    def __init__(self, workdir: Path, num_nodes: int, tls: bool = False, log=print, executor: str = "fedlease",
                 node_config: dict[int, dict[str, object]] | None = None, late: Iterable[int] = ()) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
        self.workdir = workdir.resolve()
        self.num_nodes = num_nodes
        self.tls = tls
        self.executor = executor
        self.node_config = node_config or {}  # extra node config per partition id (tests: a bad state-dir, ...)
        self.late = set(late)  # partition ids that start() leaves out: the caller starts them later (start_node)
        self.log = log
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, **ENV, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ports: dict[int, int] = {}
        self.certs: tuple[Path, Path, Path] | None = None

    # -- processes ----------------------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        home = self.workdir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        logfile = (self.workdir / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, env={**self.env, "FLWR_HOME": str(home)}, stdout=logfile,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = proc
        return proc

    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def wait_healthy(self, name: str, port: int) -> None:
        import ssl

        context = ssl.create_default_context(cafile=str(self.certs[0])) if self.tls and name == "superlink" else None
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise DeploymentError(f"{name} exited with status {self.processes[name].returncode}; see "
                                      f"{self.workdir / 'logs' / (name + '.log')}")
            scheme = self.scheme() if name == "superlink" else "http"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context):
                    return
            time.sleep(0.25)
        raise DeploymentError(f"{name} did not answer on 127.0.0.1:{port} within {HEALTH_TIMEOUT:.0f}s")

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        security = ["--insecure"]
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs")
            ca, cert, key = self.certs
            security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        self.spawn("superlink", [str(self.bin / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                                 "--disable-runtime-dependency-installation", *security])
        self.wait_healthy("superlink", self.port)
        self.log(f"SuperLink on 127.0.0.1:{self.port} ({'TLS' if self.tls else 'insecure'})")
        for pid in range(self.num_nodes):
            if pid not in self.late:
                self.start_node(pid)
        self.write_connection()

    def state_dir(self, partition_id: int) -> Path:
        return self.workdir / "state" / f"client-{partition_id}"

    def start_node(self, partition_id: int) -> None:
        port = self.node_ports.setdefault(partition_id, free_port())
        security = ["--root-certificates", str(self.certs[0])] if self.tls else ["--insecure"]
        name = f"supernode-{partition_id}"
        config = {"partition-id": partition_id, "num-partitions": self.num_nodes,
                  "state-dir": str(self.state_dir(partition_id)), **self.node_config.get(partition_id, {})}
        isolation = ["--isolation", "process"] if self.executor == "fedlease" else []
        node = self.spawn(name, [str(self.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                 "--port", str(port), "--node-config", node_config_arg(config), *isolation,
                                 *security])
        self.wait_healthy(name, port)
        if self.executor == "fedlease":  # the node's Runtime API is plain HTTP on loopback, as Flower's default
            self.spawn(f"executor-{partition_id}", [str(self.bin / "fedlease"), "executor", "--runtime-api-address",
                                                    f"127.0.0.1:{port}", "--parent-pid", str(node.pid)])
        self.log(f"SuperNode for client {partition_id} on 127.0.0.1:{port} ({self.executor} executor)")

    def kill_node(self, partition_id: int, sig: int = signal.SIGKILL) -> None:
        for name in (f"supernode-{partition_id}", f"executor-{partition_id}"):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the run ------------------------------------------------------------------------------------------
    def write_connection(self) -> Path:
        home = self.workdir / "homes" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        security = (f"root-certificates = {toml_value(str(self.certs[0]))}" if self.tls else "insecure = true")
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{security}\n', encoding="utf-8")
        return home

    def submit(self, config: RunConfig, round_timeout: float = 600.0, resume: bool = False,
               stream_to=None, secure_aggregation: bool = False) -> subprocess.CompletedProcess:
        """Run ``config`` with ``flwr run --stream`` and wait for it; its output goes to ``stream_to``."""
        values = {**to_run_config(config), "round-timeout": round_timeout, "resume": resume,
                  "wait-nodes-timeout": HEALTH_TIMEOUT, "secure-aggregation": secure_aggregation}
        overrides = self.workdir / "run-config.toml"
        overrides.write_text("\n".join(f"{k} = {toml_value(v)}" for k, v in values.items()) + "\n", encoding="utf-8")
        app = write_app(self.workdir / "app")
        args = [str(self.bin / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", str(overrides)]
        env = {**self.env, "FLWR_HOME": str(self.workdir / "homes" / "cli")}
        return subprocess.run(args, env=env, stdout=stream_to, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False)


def deploy(config: RunConfig, workdir: Path, tls: bool = False, executor: str = "fedlease",
           secure_aggregation: bool = False) -> Path:
    """Start, run ``config`` on one SuperNode per client, stream the log, stop. Returns the output directory.

    Everything that can be checked here (flags, tasks, data, model location, output directory) is checked
    before any process starts: inside the run an error would only surface in the streamed log."""
    from fedlease.runtime.simulation import check_model_source, check_output_dir, load_partition, prepare_config

    config = prepare_config(dataclasses.replace(config, output_dir=str(Path(config.output_dir).expanduser().resolve())))
    if secure_aggregation:
        from fedlease.runtime.flower.secure import refuse

        refuse(config)
    check_output_dir(config)
    load_partition(config)
    check_model_source(config)
    out = Path(config.output_dir)
    with LoopbackDeployment(workdir, config.num_clients, tls=tls, log=lambda line: print(line, flush=True),
                            executor=executor) as dep:
        dep.submit(config, stream_to=None, secure_aggregation=secure_aggregation)
    history = out / "training_history.json"
    if not history.exists() or json.loads(history.read_text()).get("final") is None:
        raise DeploymentError(f"the Flower run did not finish; see {workdir / 'logs'} and {out / 'training_log.txt'}")
    return out
