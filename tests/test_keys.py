"""CURVE key files: `geomgen keys init/add/list/revoke` through the command line,
loading keys with each way a file can be wrong, the flag/env precedence, the
allow-list reloading when its folders change, and a real CURVE handshake on
loopback with keys the command line made."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from geomgen import keys
from geomgen.cli import cli
from geomgen.errors import InputError

ROLE_FOLDERS = ["clients", "gpu-workers", "sdf-workers"]


def run_keys(*args: str, env: dict[str, str] | None = None):
    """``geomgen keys ARGS`` in-process; the result has exit_code, stdout and stderr."""
    return CliRunner().invoke(cli, ["keys", *args], env=env)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geomgen: error: "), result.stderr
    return lines[0]


@pytest.fixture
def folder(tmp_path) -> Path:
    """A key folder made by ``geomgen keys init``."""
    path = tmp_path / "keys"
    result = run_keys("init", str(path))
    assert result.exit_code == 0, result.output
    return path


def add(folder: Path, role: str, name: str) -> tuple[Path, Path]:
    result = run_keys("add", role, name, "--keys", str(folder))
    assert result.exit_code == 0, result.output
    sub = folder / keys.ROLES[role]
    return sub / f"{name}.key", sub / f"{name}.key_secret"


# --- the command line -----------------------------------------------------------------


def test_init_makes_the_layout_with_private_modes(tmp_path):
    path = tmp_path / "keys"
    result = run_keys("init", str(path))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in path.iterdir()) == ["broker.key", "broker.key_secret", *ROLE_FOLDERS]
    assert mode(path) == 0o700
    assert mode(path / "broker.key_secret") == 0o600
    assert all(mode(path / sub) == 0o700 for sub in ROLE_FOLDERS)
    public, secret = zmq.auth.load_certificate(path / "broker.key_secret")
    assert zmq.auth.load_certificate(path / "broker.key") == (public, None)
    assert secret is not None and zmq.curve_public(secret) == public
    assert "next: geomgen keys add" in result.stdout


def test_init_refuses_to_overwrite_a_broker_key_unless_forced(folder):
    before = (folder / "broker.key_secret").read_bytes()
    assert "already exists" in one_line_error(run_keys("init", str(folder)))
    assert (folder / "broker.key_secret").read_bytes() == before
    result = run_keys("init", str(folder), "--force")
    assert result.exit_code == 0, result.output
    assert (folder / "broker.key_secret").read_bytes() != before
    assert keys.load_broker_keys(folder).public == zmq.auth.load_certificate(folder / "broker.key")[0]


@pytest.mark.parametrize("role", list(keys.ROLES))
def test_add_makes_an_allowed_key_and_a_private_secret_for_each_role(folder, role):
    result = run_keys("add", role, "peer-1.a_b", "--keys", str(folder))
    assert result.exit_code == 0, result.output
    public_path = folder / keys.ROLES[role] / "peer-1.a_b.key"
    secret_path = public_path.with_name("peer-1.a_b.key_secret")
    assert mode(secret_path) == 0o600
    public, secret = zmq.auth.load_certificate(secret_path)
    assert secret is not None and zmq.curve_public(secret) == public
    assert zmq.auth.load_certificate(public_path) == (public, None)
    assert keys.allowed_keys(folder, role) == {public: "peer-1.a_b"}
    assert f"copy {secret_path} and {folder / 'broker.key'}" in result.stdout
    assert "--key peer-1.a_b.key_secret --broker-key broker.key" in result.stdout


def test_add_refuses_to_overwrite(folder):
    _, secret_path = add(folder, "client", "laptop")
    before = secret_path.read_bytes()
    assert "already exists" in one_line_error(run_keys("add", "client", "laptop", "--keys", str(folder)))
    assert secret_path.read_bytes() == before


def test_add_takes_the_folder_from_the_environment(folder):
    result = run_keys("add", "sdf-worker", "cpu-host", env={"GEOMGEN_KEYS": str(folder)})
    assert result.exit_code == 0, result.output
    assert (folder / "sdf-workers" / "cpu-host.key").exists()


@pytest.mark.parametrize("args, says", [
    (("add", "worker", "x"), "unknown role 'worker'"),
    (("add", "client", "../x"), "bad peer name"),
    (("add", "client", "a/b"), "bad peer name"),
    (("add", "client", ".hidden"), "bad peer name"),
    (("add", "client", "--", "-x"), "bad peer name"),
    (("revoke", "gpu", "x"), "unknown role 'gpu'"),
])
def test_bad_role_or_name_is_one_line_exit_2(folder, args, says):
    assert says in one_line_error(run_keys(args[0], "--keys", str(folder), *args[1:]))
    assert sorted(p.name for p in folder.iterdir()) == ["broker.key", "broker.key_secret", *ROLE_FOLDERS]
    assert not any(any((folder / sub).iterdir()) for sub in ROLE_FOLDERS)


@pytest.mark.parametrize("name", ["", ".", "..", "a b", "x/y", "é", "a" * 65, "-x", ".x", "x\n"])
def test_check_name_refuses_anything_that_is_not_a_plain_name(name):
    with pytest.raises(InputError) as caught:
        keys.check_name(name)
    assert caught.value.code == "bad_name"


def test_add_without_a_folder_or_before_init_says_what_to_do(tmp_path):
    assert "give --keys DIR or set GEOMGEN_KEYS" in one_line_error(run_keys("add", "client", "x", env={"GEOMGEN_KEYS": ""}))
    assert "geomgen keys init" in one_line_error(run_keys("add", "client", "x", "--keys", str(tmp_path)))


def test_list_shows_roles_names_and_fingerprints(folder):
    public_path, _ = add(folder, "client", "laptop")
    gpu_public, gpu_secret = add(folder, "gpu-worker", "gpu-host")
    gpu_secret.unlink()  # copied to its peer
    result = run_keys("list", "--keys", str(folder))
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    broker_public = zmq.auth.load_certificate(folder / "broker.key")[0]
    assert ["broker", "-", broker_public[:8].decode()] in rows
    laptop = zmq.auth.load_certificate(public_path)[0][:8].decode()
    assert ["client", "laptop", laptop, "(secret", "still", "here)"] in rows
    assert ["gpu-worker", "gpu-host", zmq.auth.load_certificate(gpu_public)[0][:8].decode()] in rows


def test_revoke_removes_the_public_key_and_keeps_or_deletes_the_secret(folder):
    laptop_public, laptop_secret = add(folder, "client", "laptop")
    gpu_public, gpu_secret = add(folder, "gpu-worker", "gpu-host")
    result = run_keys("revoke", "client", "laptop", "--keys", str(folder))
    assert result.exit_code == 0, result.output
    assert not laptop_public.exists() and laptop_secret.exists()
    assert "is kept" in result.stdout
    result = run_keys("revoke", "gpu-worker", "gpu-host", "--keys", str(folder), "--delete-secret")
    assert result.exit_code == 0, result.output
    assert not gpu_public.exists() and not gpu_secret.exists()
    assert keys.list_peers(folder) == []
    assert "no gpu-worker key named gpu-host" in one_line_error(
        run_keys("revoke", "gpu-worker", "gpu-host", "--keys", str(folder)))


def test_the_keys_command_runs_as_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "geomgen", "keys", "add", "client", "a b", "--keys", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("geomgen: error: bad peer name") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


# --- loading keys ---------------------------------------------------------------------


def test_load_peer_keys_reads_both_halves_and_the_broker_key(folder):
    _, secret_path = add(folder, "client", "laptop")
    loaded = keys.load_peer_keys(secret_path, folder / "broker.key")
    public, secret = zmq.auth.load_certificate(secret_path)
    assert loaded == keys.PeerKeys(public=public, secret=secret,
                                   broker_public=zmq.auth.load_certificate(folder / "broker.key")[0])


def _damaged(path: Path, half: str) -> Path:
    text = path.read_text()
    start = text.index(f'{half}-key = "') + len(f'{half}-key = "')
    out = path.with_name("damaged.key_secret")
    out.write_text(text[:start] + text[start + 5:])  # five characters short
    return out


def _mismatched(path: Path) -> Path:
    text = path.read_text()
    other_public, _ = zmq.curve_keypair()
    start = text.index('public-key = "') + len('public-key = "')
    out = path.with_name("mismatched.key_secret")
    out.write_text(text[:start] + other_public.decode() + text[start + 40:])
    return out


@pytest.mark.parametrize("case, says", [
    ("missing key", "key file {key}.missing does not exist"),
    ("missing broker key", "broker key file {broker}.missing does not exist"),
    ("unreadable (a folder)", "cannot read key file"),
    ("not a key file", "is not a CURVE key file"),
    ("public file given for --key", "holds only a public key; --key needs the peer's .key_secret"),
    ("broker secret given for --broker-key", "holds the broker's secret key"),
    ("wrong length", "has a public key of 35 characters"),
    ("wrong secret length", "has a secret key of 35 characters"),
    ("halves that do not belong together", "does not belong to its public key"),
])
def test_load_peer_keys_names_the_file_and_what_is_wrong(folder, case, says):
    public_path, secret_path = add(folder, "client", "laptop")
    key, broker = secret_path, folder / "broker.key"
    if case == "missing key":
        key = Path(f"{secret_path}.missing")
    elif case == "missing broker key":
        broker = Path(f"{broker}.missing")
    elif case == "unreadable (a folder)":
        key = folder / "clients"
    elif case == "not a key file":
        key = folder / "note.txt"
        key.write_bytes(b"\x89PNG\r\n\x1a\n not a key\n")
    elif case == "public file given for --key":
        key = public_path
    elif case == "broker secret given for --broker-key":
        broker = folder / "broker.key_secret"
    elif case == "wrong length":
        key = _damaged(secret_path, "public")
    elif case == "wrong secret length":
        key = _damaged(secret_path, "secret")
    elif case == "halves that do not belong together":
        key = _mismatched(secret_path)
    with pytest.raises(InputError) as caught:
        keys.load_peer_keys(key, broker)
    assert caught.value.code == "bad_key"
    assert says.format(key=secret_path, broker=folder / "broker.key") in str(caught.value)
    assert str(key if "broker" not in case else broker) in str(caught.value)


def test_peer_keys_from_env_prefers_flags_and_needs_both(folder, monkeypatch):
    _, laptop = add(folder, "client", "laptop")
    _, phone = add(folder, "client", "phone")
    broker = str(folder / "broker.key")
    monkeypatch.delenv("GEOMGEN_KEY", raising=False)
    monkeypatch.delenv("GEOMGEN_BROKER_KEY", raising=False)
    assert keys.peer_keys_from_env(None, None) is None
    assert keys.peer_keys_from_env(str(laptop), broker) == keys.load_peer_keys(laptop, broker)
    with pytest.raises(InputError, match="--key is set but --broker-key is not"):
        keys.peer_keys_from_env(str(laptop), None)
    with pytest.raises(InputError, match="--broker-key is set but --key is not"):
        keys.peer_keys_from_env(None, broker)

    monkeypatch.setenv("GEOMGEN_KEY", str(phone))
    monkeypatch.setenv("GEOMGEN_BROKER_KEY", broker)
    assert keys.peer_keys_from_env(None, None) == keys.load_peer_keys(phone, broker)
    assert keys.peer_keys_from_env(str(laptop), None) == keys.load_peer_keys(laptop, broker)
    monkeypatch.setenv("GEOMGEN_BROKER_KEY", str(folder / "nothing.key"))
    assert keys.peer_keys_from_env(None, broker).public == keys.load_peer_keys(phone, broker).public
    monkeypatch.delenv("GEOMGEN_BROKER_KEY")
    with pytest.raises(InputError, match="nor GEOMGEN_BROKER_KEY"):
        keys.peer_keys_from_env(None, None)


def test_load_broker_keys_says_what_is_missing(folder, tmp_path):
    loaded = keys.load_broker_keys(folder)
    assert (loaded.public, loaded.secret) == zmq.auth.load_certificate(folder / "broker.key_secret")
    assert loaded.folder == folder
    with pytest.raises(InputError, match="does not exist; run `geomgen keys init"):
        keys.load_broker_keys(tmp_path / "nowhere")
    (folder / "sdf-workers").rmdir()
    with pytest.raises(InputError, match="no sdf-workers/ folder"):
        keys.load_broker_keys(folder)
    (folder / "broker.key_secret").unlink()
    with pytest.raises(InputError, match="has no broker.key_secret; run `geomgen keys init"):
        keys.load_broker_keys(folder)


def test_allowed_keys_skips_malformed_files_with_a_warning(folder, caplog):
    public_path, _ = add(folder, "gpu-worker", "good")
    (folder / "gpu-workers" / "junk.key").write_text("hello\n")
    assert keys.allowed_keys(folder, "gpu-worker") == {zmq.auth.load_certificate(public_path)[0]: "good"}
    assert "junk.key is not a CURVE key file" in caplog.text


# --- the allow-list reloading -------------------------------------------------------------


def test_allow_list_picks_up_an_added_and_a_revoked_key(folder):
    laptop_public, _ = add(folder, "client", "laptop")
    laptop = zmq.auth.load_certificate(laptop_public)[0]
    allow = keys.AllowList(folder)
    assert allow.role_of(laptop) == "client" and allow.name_of("client", laptop) == "laptop"
    assert allow.maybe_reload(100.0) is False  # nothing changed since it was made

    gpu_public, _ = add(folder, "gpu-worker", "gpu-host")
    gpu = zmq.auth.load_certificate(gpu_public)[0]
    assert allow.maybe_reload(100.5) is False  # looked less than a second ago
    assert allow.role_of(gpu) is None
    assert allow.maybe_reload(101.0) is True
    assert allow.role_of(gpu) == "gpu-worker" and allow.name_of("gpu-worker", gpu) == "gpu-host"
    assert allow.name_of("client", gpu) is None and not allow.allows("client", gpu)
    assert allow.allows("gpu-worker", zmq.utils.z85.decode(gpu))  # a ZAP request's raw 32 bytes

    run_keys("revoke", "client", "laptop", "--keys", str(folder))
    assert allow.maybe_reload(102.0) is True
    assert allow.role_of(laptop) is None and allow.callback("client", laptop) is False
    assert allow.maybe_reload(103.0) is False


def test_allow_list_notices_a_key_file_replaced_in_place(folder):
    public_path, _ = add(folder, "sdf-worker", "cpu")
    allow = keys.AllowList(folder)
    old = zmq.auth.load_certificate(public_path)[0]
    new_public, _ = zmq.curve_keypair()
    folder_mtime_ns = (folder / "sdf-workers").stat().st_mtime_ns
    public_path.write_text(public_path.read_text().replace(old.decode(), new_public.decode()))
    os.utime(public_path, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    os.utime(folder / "sdf-workers", ns=(folder_mtime_ns, folder_mtime_ns))  # the folder looks unchanged
    assert allow.maybe_reload(10.0) is True
    assert allow.name_of("sdf-worker", new_public) == "cpu" and allow.name_of("sdf-worker", old) is None


def test_allow_list_reload_reads_everything_now(folder):
    allow = keys.AllowList(folder)
    assert allow.maybe_reload(50.0) is False
    public_path, _ = add(folder, "client", "laptop")
    allow.reload()  # SIGHUP: no waiting for the once-a-second check
    assert allow.role_of(zmq.auth.load_certificate(public_path)[0]) == "client"


# --- a real CURVE handshake with keys the command line made ------------------------------


@pytest.fixture
def curve_router(folder, zctx):
    """A CURVE-server ROUTER on loopback whose ZAP handler allows ``folder``'s client keys."""
    auth = ThreadAuthenticator(zctx)
    auth.start()
    auth.configure_curve(domain="client", location=str(folder / "clients"))
    router = zctx.socket(zmq.ROUTER)
    router.linger = 0
    keys.apply_server_curve(router, keys.load_broker_keys(folder), "client")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"tcp://127.0.0.1:{port}", auth
    router.close(linger=0)
    auth.stop()


def _dealer(zctx, peer_keys: keys.PeerKeys, address: str):
    dealer = zctx.socket(zmq.DEALER)
    dealer.linger = 0
    keys.apply_client_curve(dealer, peer_keys)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    dealer.connect(address)
    return dealer, monitor


def _handshake(monitor, timeout_s: float = 10.0) -> int:
    assert monitor.poll(timeout_s * 1000), "no handshake event"
    return recv_monitor_message(monitor)["event"]


def test_curve_handshake_accepts_an_allowed_key_and_refuses_an_unknown_one(folder, curve_router, zctx, tmp_path):
    router, address, auth = curve_router
    _, laptop_secret = add(folder, "client", "laptop")
    auth.configure_curve(domain="client", location=str(folder / "clients"))  # the stock authenticator reloads by hand
    broker_key = folder / "broker.key"

    dealer, monitor = _dealer(zctx, keys.load_peer_keys(laptop_secret, broker_key), address)
    stranger_folder = tmp_path / "stranger"
    run_keys("init", str(stranger_folder))
    _, stranger_secret = add(stranger_folder, "client", "stranger")
    stranger, stranger_monitor = _dealer(zctx, keys.load_peer_keys(stranger_secret, broker_key), address)
    try:
        assert _handshake(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        dealer.send(b"hello")
        assert router.poll(10_000), "the allowed client's message did not arrive"
        _identity, body = router.recv_multipart()
        assert body == b"hello"

        assert _handshake(stranger_monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        try:  # a refused DEALER may have no pipe left: a blocking send would wait forever
            stranger.send(b"let me in", zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert router.poll(200) == 0  # the refused peer's message never reaches the router
    finally:
        for sock in (dealer, stranger):
            sock.disable_monitor()
        for sock in (monitor, stranger_monitor, dealer, stranger):
            sock.close(linger=0)


def test_curve_handshake_through_the_allow_list_refuses_a_revoked_key(folder, zctx):
    _, laptop_secret = add(folder, "client", "laptop")
    _, gpu_secret = add(folder, "gpu-worker", "gpu-host")
    allow = keys.AllowList(folder)
    auth = ThreadAuthenticator(zctx)
    auth.start()
    auth.configure_curve_callback(domain="client", credentials_provider=allow)
    router = zctx.socket(zmq.ROUTER)
    keys.apply_server_curve(router, keys.load_broker_keys(folder), "client")
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    broker_key = folder / "broker.key"
    sockets = [router]
    try:
        def attempt(secret: Path) -> int:
            dealer, monitor = _dealer(zctx, keys.load_peer_keys(secret, broker_key), address)
            sockets.extend([dealer, monitor])
            event = _handshake(monitor)
            dealer.disable_monitor()
            return event

        assert attempt(laptop_secret) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert attempt(gpu_secret) == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # a worker key on the client port
        run_keys("revoke", "client", "laptop", "--keys", str(folder))
        allow.reload()
        assert attempt(laptop_secret) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        for sock in sockets:
            sock.close(linger=0)
        auth.stop()
