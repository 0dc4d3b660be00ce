"""CURVE key files: the broker's key pair, one allow-list folder per peer role, and
the peers' own key pairs; making them (`geomgen keys ...`), loading them, and the
allow-list the broker consults and reloads while it runs.

Keys are handled as 40-character Z85 ``bytes`` throughout (what pyzmq's socket
options and key files use); files are in pyzmq's certificate format, so
``zmq.auth`` reads them too.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from geomgen.errors import InputError

log = logging.getLogger(__name__)

ROLES = {"client": "clients", "gpu-worker": "gpu-workers", "sdf-worker": "sdf-workers"}
BROKER_PUBLIC = "broker.key"
BROKER_SECRET = "broker.key_secret"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_ENV = "GEOMGEN_KEY"  # a peer's own .key_secret
BROKER_KEY_ENV = "GEOMGEN_BROKER_KEY"  # the broker's public broker.key
KEYS_ENV = "GEOMGEN_KEYS"  # the broker's key folder
KEY_LENGTH = 40  # characters of a Z85-encoded 32-byte CURVE key
FINGERPRINT_LENGTH = 8  # characters of the Z85 public key shown by `keys list`
RELOAD_CHECK_INTERVAL_S = 1.0  # AllowList looks at its folders at most this often
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_Z85 = frozenset(z85.Z85CHARS)

PathLike = str | os.PathLike[str]


# --- names and roles: the one place these rules live -----------------------------------


def role_folder(role: str) -> str:
    """The allow-list folder name of ``role`` (``client`` -> ``clients``).

    Raises InputError ``bad_role`` for anything but the three roles.
    """
    try:
        return ROLES[role]
    except KeyError:
        raise InputError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}", code="bad_role") from None


def check_name(name: str) -> str:
    """Return ``name`` if it can name a peer's key files, else raise InputError ``bad_name``.

    A name is 1-64 letters, digits, ``_ . -``, not starting with ``.`` or ``-``,
    so it can never be a path or a hidden file.
    """
    if not _NAME.fullmatch(name):
        raise InputError(f"bad peer name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "not starting with '.' or '-'", code="bad_name")
    return name


def fingerprint(public_key: bytes) -> str:
    """The first 8 characters of a Z85 public key, as ``keys list`` shows it."""
    return public_key[:FINGERPRINT_LENGTH].decode("ascii", "replace")


def _z85_key(key: bytes | str) -> bytes:
    """A key as 40-character Z85 bytes, from Z85 text/bytes or 32 raw bytes (a ZAP request's)."""
    if isinstance(key, str):
        return key.encode("ascii", "replace")
    if len(key) == 32:
        return z85.encode(key)
    return key


# --- reading key files --------------------------------------------------------------


def _read_key_file(path: Path, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file, or InputError ``bad_key`` saying what is wrong."""
    if not path.exists():
        raise InputError(f"{what} {path} does not exist", code="bad_key")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise InputError(f"{what} {path} is not a CURVE key file (it has no public-key line)",
                         code="bad_key") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}", code="bad_key") from None
    for half, key in (("public", public), ("secret", secret)):
        if key is not None and (len(key) != KEY_LENGTH or not set(key) <= _Z85):
            raise InputError(f"{what} {path} has a {half} key of {len(key)} characters that is not a "
                             f"{KEY_LENGTH}-character Z85 CURVE key; the file is damaged", code="bad_key")
    if secret is not None and zmq.curve_public(secret) != public:
        raise InputError(f"{what} {path} holds a secret key that does not belong to its public key; "
                         "the file was edited or damaged", code="bad_key")
    return public, secret


def _warn_if_shared(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("secret key file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)


def public_key_of(path: PathLike) -> bytes:
    """The Z85 public key in a key file (public or secret); InputError ``bad_key`` if unusable."""
    return _read_key_file(Path(path), "key file")[0]


@dataclass(frozen=True)
class PeerKeys:
    """What a peer (client, GPU worker, SDF worker) needs to connect with CURVE.

    Attributes:
        public: the peer's public key, 40 Z85 bytes.
        secret: the peer's secret key, 40 Z85 bytes.
        broker_public: the broker's public key, 40 Z85 bytes.
    """

    public: bytes
    secret: bytes
    broker_public: bytes


def load_peer_keys(key_file: PathLike, broker_key_file: PathLike) -> PeerKeys:
    """Read a peer's ``.key_secret`` (both halves) and the broker's public ``.key``.

    Raises InputError ``bad_key`` with a sentence naming the file and what is
    wrong: missing, unreadable, not a key file, a public file where the secret
    is needed (or the broker's secret where its public key will do), damaged.
    """
    key_path, broker_path = Path(key_file), Path(broker_key_file)
    public, secret = _read_key_file(key_path, "key file")
    if secret is None:
        raise InputError(f"key file {key_path} holds only a public key; --key needs the peer's "
                         f"{SECRET_SUFFIX} file, made next to it by `geomgen keys add`", code="bad_key")
    _warn_if_shared(key_path)
    broker_public, broker_secret = _read_key_file(broker_path, "broker key file")
    if broker_secret is not None:
        raise InputError(f"broker key file {broker_path} holds the broker's secret key; peers need only the "
                         f"public {BROKER_PUBLIC}, and {BROKER_SECRET} should never leave the broker host",
                         code="bad_key")
    return PeerKeys(public=public, secret=secret, broker_public=broker_public)


def peer_keys_from_env(key: str | None, broker_key: str | None) -> PeerKeys | None:
    """A peer's keys from ``--key``/``--broker-key``, else ``GEOMGEN_KEY``/``GEOMGEN_BROKER_KEY``.

    Each flag, when given, wins over its environment variable. Returns None when
    neither file is named (the peer runs without CURVE); raises InputError
    ``bad_key`` when only one is, or when a file is unusable.
    """
    key = key or os.environ.get(KEY_ENV) or None
    broker_key = broker_key or os.environ.get(BROKER_KEY_ENV) or None
    if key is None and broker_key is None:
        return None
    if key is None or broker_key is None:
        given, missing = ("--key", "--broker-key") if broker_key is None else ("--broker-key", "--key")
        env = {"--key": KEY_ENV, "--broker-key": BROKER_KEY_ENV}
        raise InputError(f"{given} is set but {missing} is not (nor {env[missing]}); a peer needs its own "
                         f"{SECRET_SUFFIX} and the broker's public {BROKER_PUBLIC}", code="bad_key")
    return load_peer_keys(key, broker_key)


@dataclass(frozen=True)
class BrokerKeys:
    """The broker's key pair and the folder its allow-lists live in.

    Attributes:
        public: the broker's public key, 40 Z85 bytes.
        secret: the broker's secret key, 40 Z85 bytes.
        folder: the key folder made by ``geomgen keys init``.
    """

    public: bytes
    secret: bytes
    folder: Path


def load_broker_keys(folder: PathLike) -> BrokerKeys:
    """Read the broker's key pair from a folder made by ``geomgen keys init``.

    Raises InputError ``bad_key`` naming what is missing or wrong.
    """
    folder = Path(folder)
    init = f"run `geomgen keys init {folder}` to make it"
    if not folder.is_dir():
        raise InputError(f"key folder {folder} does not exist; {init}", code="bad_key")
    secret_path = folder / BROKER_SECRET
    if not secret_path.exists():
        raise InputError(f"key folder {folder} has no {BROKER_SECRET}; {init}", code="bad_key")
    public, secret = _read_key_file(secret_path, "broker key file")
    if secret is None:
        raise InputError(f"broker key file {secret_path} holds only a public key; {init} again "
                         "(with --force, then give the peers the new broker.key)", code="bad_key")
    _warn_if_shared(secret_path)
    public_path = folder / BROKER_PUBLIC
    if public_path.exists() and _read_key_file(public_path, "broker key file")[0] != public:
        raise InputError(f"{public_path} is not the public half of {secret_path}; peers holding it "
                         "would be refused; copy the right one or run `geomgen keys init --force`", code="bad_key")
    for role, sub in ROLES.items():
        if not (folder / sub).is_dir():
            raise InputError(f"key folder {folder} has no {sub}/ folder for {role} keys; {init}", code="bad_key")
    return BrokerKeys(public=public, secret=secret, folder=folder)


def allowed_keys(folder: PathLike, role: str) -> dict[bytes, str]:
    """The allowed public keys of ``role``: Z85 key -> peer name, from ``<folder>/<role folder>/*.key``.

    Malformed files are skipped with a logged warning; a missing role folder
    allows nobody.
    """
    sub = Path(folder) / role_folder(role)
    keys: dict[bytes, str] = {}
    try:
        paths = sorted(sub.glob("*" + PUBLIC_SUFFIX))
    except OSError as exc:
        log.warning("cannot list %s allow-list %s: %s; allowing no %s", role, sub, exc, role)
        return keys
    for path in paths:
        try:
            public, _ = _read_key_file(path, f"{role} key file")
        except InputError as exc:
            log.warning("skipping %s", exc)
            continue
        name = path.name[: -len(PUBLIC_SUFFIX)]
        if public in keys:
            log.warning("%s and %s%s in %s hold the same key; using the name %s",
                        keys[public], name, PUBLIC_SUFFIX, sub, keys[public])
            continue
        keys[public] = name
    return keys


# --- the allow-list the broker consults -------------------------------------------------


def _folder_signature(sub: Path) -> object:
    """What changes when a key file in ``sub`` is added, removed, replaced or touched."""
    try:
        files = frozenset((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                          for e in os.scandir(sub) if e.name.endswith(PUBLIC_SUFFIX))
        return sub.stat().st_mtime_ns, files
    except OSError:
        return None


class AllowList:
    """The three roles' allowed keys, reloaded from the key folder when it changes.

    Thread-safe for readers: a reload swaps whole tables, so the ZAP thread can
    call `allows` (or `callback`, for ``configure_curve_callback``) while the
    broker's loop calls `maybe_reload`.
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        # Re-entrant: a SIGHUP handler calling reload() may interrupt maybe_reload() on the same thread.
        self._lock = threading.RLock()
        self._keys: dict[str, dict[bytes, str]] = {role: {} for role in ROLES}
        self._signatures: dict[str, object] = {}
        self._checked_at_s: float | None = None
        self.reload()

    def reload(self) -> None:
        """Read every role's folder again now (on SIGHUP)."""
        with self._lock:
            for role in ROLES:
                self._load(role)

    def maybe_reload(self, now: float) -> bool:
        """Reload the roles whose folder changed, looking at most once per second.

        Args:
            now: monotonic time, s (``time.monotonic()``).
        Returns:
            True when some role's keys were reloaded.
        """
        if self._checked_at_s is not None and now - self._checked_at_s < RELOAD_CHECK_INTERVAL_S:
            return False
        self._checked_at_s = now
        changed = False
        with self._lock:
            for role, sub in ROLES.items():
                if _folder_signature(self.folder / sub) != self._signatures.get(role):
                    self._load(role)
                    changed = True
        return changed

    def _load(self, role: str) -> None:
        sub = self.folder / ROLES[role]
        signature = _folder_signature(sub)
        keys = allowed_keys(self.folder, role)
        before = self._keys[role]
        for key in keys.keys() - before.keys():
            log.info("allowing %s %s (%s)", role, keys[key], fingerprint(key))
        for key in before.keys() - keys.keys():
            log.info("no longer allowing %s %s (%s)", role, before[key], fingerprint(key))
        self._keys = {**self._keys, role: keys}
        self._signatures[role] = signature

    def allows(self, role: str, public_key: bytes | str) -> bool:
        """Whether ``public_key`` (Z85, or 32 raw bytes) is on ``role``'s allow-list."""
        return _z85_key(public_key) in self._keys.get(role, {})

    def role_of(self, public_key_z85: bytes | str) -> str | None:
        """The first role (in ROLES order) that allows the key, or None."""
        key = _z85_key(public_key_z85)
        return next((role for role, keys in self._keys.items() if key in keys), None)

    def name_of(self, role: str, public_key_z85: bytes | str) -> str | None:
        """The peer name the key was added under for ``role``, or None."""
        return self._keys.get(role, {}).get(_z85_key(public_key_z85))

    def callback(self, domain: str, key: bytes) -> bool:
        """``zmq.auth`` credentials-provider hook: the ZAP domain is the role name."""
        return self.allows(domain, key)


# --- making key files ---------------------------------------------------------------


_BANNER = ("#   ****  Generated on {now} by geomgen keys  ****\n"
           "#   ZeroMQ CURVE {kind} Certificate\n#   {advice}\n\n")


def _write_key_file(path: Path, public: bytes, secret: bytes | None, *, overwrite: bool) -> None:
    """Write a pyzmq-format key file, secret files 0600 from the start; never half-written.

    Without ``overwrite`` an existing file is never replaced (FileExistsError).
    """
    kind, advice = (("**Secret**", "Copy only to the peer it names; keep it mode 600.") if secret
                    else ("Public", "Its presence in an allow-list folder allows the peer."))
    text = _BANNER.format(now=datetime.datetime.now().isoformat(timespec="seconds"), kind=kind, advice=advice)
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, so nothing is ever overwritten
    finally:
        tmp.unlink(missing_ok=True)


def init_keys(folder: PathLike, *, force: bool = False) -> BrokerKeys:
    """Make the broker's key pair and the three allow-list folders in ``folder``.

    The folder and the role folders are made mode 0700, the secret file 0600.
    An existing broker key is replaced only with ``force`` (InputError
    ``key_exists`` otherwise); existing allow-lists are kept.
    """
    folder = Path(folder)
    existing = [p for p in (folder / BROKER_PUBLIC, folder / BROKER_SECRET) if p.exists()]
    if existing and not force:
        raise InputError(f"{existing[0]} already exists; keep it, or make a new broker key with --force "
                         "(every peer then needs the new broker.key)", code="key_exists")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder", code="bad_key")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for sub in ROLES.values():
        (folder / sub).mkdir(mode=0o700, exist_ok=True)
    public, secret = zmq.curve_keypair()
    # The secret first: a public file without its secret would make peers trust a key nobody holds.
    _write_key_file(folder / BROKER_SECRET, public, secret, overwrite=force)
    _write_key_file(folder / BROKER_PUBLIC, public, None, overwrite=force)
    return BrokerKeys(public=public, secret=secret, folder=folder)


def _initialised(folder: Path) -> None:
    if not (folder / BROKER_SECRET).exists():
        raise InputError(f"{folder} is not a key folder (no {BROKER_SECRET}); run `geomgen keys init {folder}` "
                         "first", code="bad_key")


def add_peer(folder: PathLike, role: str, name: str) -> tuple[Path, Path]:
    """Make a key pair for peer ``name`` of ``role``; returns (public file, secret file).

    The public ``<role folder>/NAME.key`` allows the peer; ``NAME.key_secret``
    (0600) is to be copied to it. Raises InputError (``bad_role``,
    ``bad_name``, ``bad_key``, ``key_exists``); never overwrites.
    """
    folder = Path(folder)
    sub = folder / role_folder(role)
    check_name(name)
    _initialised(folder)
    sub.mkdir(mode=0o700, exist_ok=True)
    public_path, secret_path = sub / (name + PUBLIC_SUFFIX), sub / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if path.exists():
            raise InputError(f"{path} already exists; choose another name, or revoke {name} with "
                             "--delete-secret first", code="key_exists")
    public, secret = zmq.curve_keypair()
    _write_key_file(secret_path, public, secret, overwrite=False)
    try:
        _write_key_file(public_path, public, None, overwrite=False)
    except BaseException:
        secret_path.unlink(missing_ok=True)
        raise
    return public_path, secret_path


@dataclass(frozen=True)
class PeerKeyRecord:
    """One allowed peer as ``keys list`` shows it."""

    role: str
    name: str
    fingerprint: str  # first 8 characters of the Z85 public key
    secret_here: bool  # its .key_secret is still in the broker's key folder


def list_peers(folder: PathLike) -> list[PeerKeyRecord]:
    """Every allowed peer in ``folder``, by role then name."""
    folder = Path(folder)
    _initialised(folder)
    records = []
    for role, sub in ROLES.items():
        for key, name in sorted(allowed_keys(folder, role).items(), key=lambda kv: kv[1]):
            records.append(PeerKeyRecord(role, name, fingerprint(key), (folder / sub / (name + SECRET_SUFFIX)).exists()))
    return records


def revoke_peer(folder: PathLike, role: str, name: str, *, delete_secret: bool = False) -> list[Path]:
    """Remove ``name``'s public key from ``role``'s allow-list (and its secret with ``delete_secret``).

    Returns the files removed; raises InputError ``no_key`` when the peer is not allowed.
    """
    sub = Path(folder) / role_folder(role)
    check_name(name)
    public_path, secret_path = sub / (name + PUBLIC_SUFFIX), sub / (name + SECRET_SUFFIX)
    removed = []
    if not public_path.exists() and not (delete_secret and secret_path.exists()):
        raise InputError(f"no {role} key named {name}: {public_path} does not exist", code="no_key")
    for path in (public_path, secret_path) if delete_secret else (public_path,):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def apply_client_curve(socket: zmq.Socket, keys: PeerKeys) -> None:
    """Make ``socket`` a CURVE client of the broker; call before ``connect``."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.broker_public


def apply_server_curve(socket: zmq.Socket, keys: BrokerKeys, role: str) -> None:
    """Make ``socket`` a CURVE server whose ZAP domain is ``role``; call before ``bind``.

    With an authenticator configured per role (``configure_curve_callback(role,
    allow_list)``), only keys on that role's allow-list get through.
    """
    role_folder(role)
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.zap_domain = role.encode()
    socket.curve_server = True
