"""Integration: the team services keep their secrets, and SeaweedFS's insides, to their owner.

The first tests need no running service (a few seconds): every file ``team_services.py``
writes a secret into is created owner-only (0600, folders 0700) by ``open`` itself, never
chmod'ed afterwards; SeaweedFS's ``security.toml`` keys every internal port; and
``configure-runner`` leaves ``.dvc/config.local`` owner-only with the S3 secret never on a
command line. The last two start SeaweedFS alone (no PostgreSQL, no MLflow) on free
loopback ports and probe its master, volume server and filer the way another local user
could: plain HTTP without keys, gRPC without the client certificate. The full two-runner
flow over the same S3 keys (DVC push/pull, MLflow artifacts) is ``test_team.py``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import socket
import ssl
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import requests

from conftest import REPO

pytestmark = [pytest.mark.integration]

BIN = Path(sys.executable).parent
SERVICES_SCRIPT = REPO / "services" / "team_services.py"
# Offsets from the port base (team_services.PORT_OFFSETS); gRPC is each one + 10000.
S3, MASTER, VOLUME, FILER = 1, 2, 3, 4
COMPONENTS = {S3: "s3", MASTER: "master", VOLUME: "volume", FILER: "filer"}
# 401/403: the volume server checks its JWT; 404: the master's and filer's HTTP APIs are
# not served at all (-disableHttp); what matters is that no data and no token comes back.
REFUSED = {401, 403, 404}
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def team_services() -> ModuleType:
    """The services script as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("team_services", SERVICES_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A usual umask (022: a file made without a mode is world-readable) and no chmod: a
    secret file that is 0600 afterwards was created 0600, never tightened after writing."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"chmod {args}: a secret must be created with its mode")

    previous = os.umask(0o022)
    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    yield
    os.umask(previous)


def test_secret_files_are_created_owner_only_never_chmodded_after(
    team_services: ModuleType, tmp_path: Path, no_chmod: None
) -> None:
    paths = team_services.Layout(tmp_path / "services", 15400)
    value = team_services.secret(paths, "some_password")
    assert len(value) == 48
    assert mode(paths.secrets) == 0o700
    assert mode(paths.secrets / "some_password") == 0o600

    # An interrupted write left its temporary file behind, world-readable: the next write
    # must not inherit that mode (open(O_TRUNC) on the old file would keep 0644).
    leftover = paths.secrets / "runner.env.tmp"
    os.close(os.open(leftover, os.O_WRONLY | os.O_CREAT, 0o644))
    team_services.write_runner_env(paths)
    assert mode(paths.secrets / "runner.env") == 0o600
    assert not leftover.exists()

    for writer in (team_services.s3_config, team_services.auth_config):
        assert mode(writer(paths)) == 0o600
    assert mode(team_services.private_file(tmp_path / "config.local")) == 0o600
    folder = team_services.seaweedfs_security(paths)
    assert mode(folder) == 0o700
    assert {path.name: mode(path) for path in folder.iterdir()} == {
        "security.toml": 0o600,
        "grpc.pem": 0o600,
        "grpc.key": 0o600,
        "grpc_ca.pem": 0o600,
    }
    for path in paths.secrets.rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path


def test_seaweedfs_security_config_keys_every_internal_port(
    team_services: ModuleType, tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    paths = team_services.Layout(tmp_path / "services", 15400)
    folder = team_services.seaweedfs_security(paths)
    config = tomllib.loads((folder / "security.toml").read_text())
    jwt = config["jwt"]
    keys = [
        jwt["signing"]["key"],  # volume writes
        jwt["signing"]["read"]["key"],  # volume reads
        jwt["filer_signing"]["key"],
        jwt["filer_signing"]["read"]["key"],
    ]
    assert all(len(key) == 48 for key in keys) and len(set(keys)) == 4
    assert config["access"]["ui"] is False
    assert config["filer"]["expose_directory_metadata"]["enabled"] is False

    authority = x509.load_pem_x509_certificate(Path(config["grpc"]["ca"]).read_bytes())
    for component in ("master", "volume", "filer", "s3", "client"):
        pair = config["grpc"][component]
        certificate = x509.load_pem_x509_certificate(Path(pair["cert"]).read_bytes())
        certificate.verify_directly_issued_by(authority)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        assert Path(pair["key"]).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # The CA's key is not kept: only the one component key is on disk.
    private_keys = [path for path in folder.iterdir() if "PRIVATE KEY" in path.read_text()]
    assert [path.name for path in private_keys] == ["grpc.key"]

    again = team_services.seaweedfs_security(paths)  # a restart keeps the certificates
    assert tomllib.loads((again / "security.toml").read_text()) == config
    assert Path(config["grpc"]["ca"]).read_bytes() == authority.public_bytes(Encoding.PEM)


def test_configure_runner_keeps_the_s3_secret_owner_only_and_off_command_lines(
    team_services: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvc.config import Config

    clone = tmp_path / "clone"
    clone.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=clone, check=True)
    local = clone / ".dvc" / "config.local"
    # What an older configure-runner left: world-readable, with a setting of the runner's.
    local.write_text("[core]\n    autostage = true\n")
    local.chmod(0o644)

    commands: list[str] = []

    class RecordingPopen(subprocess.Popen):
        """Every command started while configuring, recorded (they still run)."""

        def __init__(self, args: object, *rest: object, **options: object) -> None:
            commands.append(" ".join(map(str, args)) if isinstance(args, list) else str(args))
            super().__init__(args, *rest, **options)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    paths = team_services.Layout(tmp_path / "services", 15400)
    team_services.configure_runner(paths, clone)

    assert mode(local) == 0o600
    settings = Config(dvc_dir=str(clone / ".dvc"))
    secret_key = team_services.secret(paths, "s3_team_secret_key")
    assert settings["core"]["remote"] == "team"
    assert settings["core"]["autostage"] is True  # the runner's own setting is kept
    remote = settings["remote"]["team"]
    assert remote["url"] == "s3://braintumor/dvc"
    assert remote["endpointurl"] == paths.s3_url
    assert remote["secret_access_key"] == secret_key
    assert remote["access_key_id"] == team_services.secret(paths, "s3_team_access_key")
    assert not any(secret_key in command for command in commands), "a key on a command line"
    assert "secret_access_key" not in (clone / ".dvc" / "config").read_text()


# ---------------------------------------------------------------- a running SeaweedFS


@dataclass
class Store:
    """SeaweedFS started by the services script in a folder of its own."""

    root: Path
    base: int
    env: dict[str, str]

    def url(self, offset: int) -> str:
        return f"http://127.0.0.1:{self.base + offset}"

    def credentials(self) -> dict[str, str]:
        lines = (self.root / "secrets" / "runner.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def free_port_base() -> int:
    """A base whose S3, master, volume and filer ports and their +10000 gRPC twins are free."""
    for _ in range(50):
        base = random.randrange(20000, 29000)
        ports = [base + offset + extra for offset in COMPONENTS for extra in (0, 10000)]
        if all(port_free(port) for port in ports):
            return base
    raise RuntimeError("no run of free loopback ports found for SeaweedFS")


def services(store: Store, *args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "python"), str(SERVICES_SCRIPT), *args]
    result = subprocess.run(command, env=store.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("team-security") / "services"
    base = free_port_base()
    env = {**os.environ, "BRAINTUMOR_SERVICES_DIR": str(root)}
    env["BRAINTUMOR_SERVICES_PORT_BASE"] = str(base)
    store = Store(root, base, env)
    services(store, "up", "s3")
    try:
        yield store
    finally:
        services(store, "down", "s3")


def s3_client(store: Store):
    import boto3

    credentials = store.credentials()
    return boto3.client(
        "s3",
        endpoint_url=store.url(S3),
        region_name="us-east-1",
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    )


def chunk_file_id(store: Store, key: str) -> str:
    """The volume file id holding an object, read from the filer with the owner's tools
    (``weed shell`` with the client certificate): what an intruder would need to know."""
    folder = store.root / "secrets" / "seaweedfs"
    options = [f"-config_dir={folder}"] if folder.is_dir() else []
    command = [
        str(BIN / "weed"),
        *options,
        "shell",
        f"-master=127.0.0.1:{store.base + MASTER}",
        f"-filer=127.0.0.1:{store.base + FILER}",
    ]
    shell = subprocess.run(
        command,
        input=f"fs.meta.cat /buckets/braintumor/{key}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'"fileId":\s*"([^"]+)"', shell.stdout)
    assert found, shell.stdout[-2000:] + shell.stderr[-2000:]
    return found.group(1)


def plain(method: str, url: str, **options: object) -> tuple[int | None, str, dict[str, str]]:
    """One request with no credentials: (status or None when the connection is refused,
    body, headers)."""
    try:
        response = requests.request(method, url, timeout=15, allow_redirects=False, **options)
    except requests.ConnectionError:
        return None, "", {}
    return response.status_code, response.text, dict(response.headers)


def test_internal_http_ports_refuse_a_client_without_keys_while_s3_keys_work(
    store: Store,
) -> None:
    s3 = s3_client(store)
    payload = f"team secret payload {random.random()}".encode()
    key = "dvc/security-probe.txt"
    s3.put_object(Bucket="braintumor", Key=key, Body=payload)
    assert s3.get_object(Bucket="braintumor", Key=key)["Body"].read() == payload
    file_id = chunk_file_id(store, key)
    master, volume, filer = store.url(MASTER), store.url(VOLUME), store.url(FILER)

    probes = [  # reads first: an accepted write would spoil what the reads could show
        ("volume GET", "GET", f"{volume}/{file_id}", {}),
        ("master lookup", "GET", f"{master}/dir/lookup", {"params": {"fileId": file_id}}),
        ("master read", "GET", f"{master}/{file_id}", {}),
        ("filer GET", "GET", f"{filer}/buckets/braintumor/{key}", {}),
        ("filer list", "GET", f"{filer}/buckets/braintumor/dvc/", {}),
        ("master assign", "GET", f"{master}/dir/assign", {}),
        ("master submit", "POST", f"{master}/submit", {"files": {"file": b"intruder"}}),
        ("volume PUT", "PUT", f"{volume}/{file_id}", {"data": b"overwritten"}),
        ("volume POST", "POST", f"{volume}/{file_id}", {"files": {"file": b"overwritten"}}),
        ("filer PUT", "PUT", f"{filer}/buckets/braintumor/intruder.txt", {"data": b"x"}),
        ("filer POST", "POST", f"{filer}/buckets/braintumor/", {"files": {"file": b"x"}}),
    ]
    statuses = {}
    for name, method, url, options in probes:
        status, body, headers = plain(method, url, **options)
        statuses[name] = status
        assert status is None or status in REFUSED, f"{name}: {status} {body[:200]}"
        assert payload.decode() not in body, name
        assert "Authorization" not in headers, f"{name} handed out a token"
        assert '"fid"' not in body and "security-probe" not in body, name
    print("observed, plain HTTP without keys:", statuses)

    assert s3.get_object(Bucket="braintumor", Key=key)["Body"].read() == payload
    listed = s3.list_objects_v2(Bucket="braintumor").get("Contents", [])
    assert [item["Key"] for item in listed] == [key]  # nothing the probes tried was stored


def tls_session_answers(port: int, certificate: tuple[Path, Path] | None) -> bool:
    """Whether a gRPC port completes mutual TLS and answers HTTP/2 with ``certificate``
    (the client's pair, or None for none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if certificate is not None:
        context.load_cert_chain(*certificate)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw) as session:
                session.sendall(HTTP2_PREFACE)
                return bool(session.recv(64))
    except (ssl.SSLError, ConnectionError):
        return False


def plaintext_answers(port: int) -> bool:
    """Whether a gRPC port answers HTTP/2 in the clear (no TLS at all)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(HTTP2_PREFACE)
            return bool(connection.recv(64))
    except ConnectionError:
        return False


def stranger_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate of the same name as the store's, self-signed: not from its CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "stranger.pem").write_bytes(certificate.public_bytes(pem))
    (folder / "stranger.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "stranger.pem", folder / "stranger.key"


def test_grpc_ports_need_the_client_certificate_and_files_stay_private(
    store: Store, tmp_path: Path
) -> None:
    owner = (store.root / "secrets/seaweedfs/grpc.pem", store.root / "secrets/seaweedfs/grpc.key")
    stranger = stranger_certificate(tmp_path)
    for offset in COMPONENTS:
        port = store.base + offset + 10000
        assert not plaintext_answers(port), f"gRPC {port} answers in the clear"
        assert not tls_session_answers(port, None), f"gRPC {port} answers without a certificate"
        assert not tls_session_answers(port, stranger), f"gRPC {port} takes a stranger's"
        assert tls_session_answers(port, owner), f"gRPC {port} refuses the owner's certificate"

    # What SeaweedFS and the script wrote: volumes (the artifacts and DVC objects
    # themselves), sockets, pids, log and secrets, none of them open to other users.
    assert mode(store.root / "seaweedfs") == 0o700
    assert mode(store.root / "run") == 0o700
    assert mode(store.root / "logs" / "s3.log") == 0o600
    assert mode(store.root / "secrets") == 0o700
    for path in (store.root / "secrets").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    for offset, name in COMPONENTS.items():
        # weed's own, fixed place for its gRPC sockets (mutual TLS guards them too)
        socket_path = Path(f"/tmp/seaweedfs-{name}-grpc-{store.base + offset + 10000}.sock")
        if socket_path.exists():
            assert mode(socket_path) & 0o022 == 0, f"{socket_path}: others may connect"
