"""Secrets at rest in the data directory: the directory and its files are the owner's only, and what must stay
recoverable (room PINs, webhook secrets) is sealed with a key kept beside the data, while app_keys are kept
only as keyed hashes.

- `private_dir(DATA_DIR)`: the directory is 0700 and every entry below it owner-only (a directory made by an
  older version with looser modes is tightened once per process, with one log line), the model being
  PostgreSQL's data directory (0700, umask 077) and OpenSSH's ~/.ssh.
- `private_sqlite(path)`: an SQLite file made 0600 before anything is written to it (SQLite gives its -wal and
  -shm files the mode of the database file, so they follow).
- `DataKey`: 32 random bytes in DATA_DIR/store.key (0600), made once (atomically, whichever process comes
  first). Sub-keys per purpose (HMAC-SHA256 of a label); `seal`/`unseal` are AES-256-GCM from the
  `cryptography` package: authenticated encryption (a changed or swapped ciphertext fails instead of decrypting
  to something else) from a well-kept library, no hand-rolled crypto. The associated data binds each
  ciphertext to its row and column, so a PIN cannot be moved to another room or to the moderator column.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import log
from ..config import ConfigError

logger = logging.getLogger("gateway.store")
KEY_FILE = "store.key"
SEALED = "v1."  # prefix of a sealed value (clear PINs are digits, so the two never mix up)
_lock = threading.Lock()
_secured: set[Path] = set()  # data dirs this process has already checked
_keys: dict[Path, DataKey] = {}


def private_dir(path: Path | str) -> Path:
    """Make `path` (and missing parents) 0700; the first time this process sees it, tighten everything below it
    to owner-only (files made by an older version, by hand, or under a loose umask) and log what was changed."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = path.resolve()
    with _lock:
        if key in _secured:
            return path
        _secured.add(key)
    before = stat.S_IMODE(path.stat().st_mode)
    changed = 0
    if before & 0o077:
        path.chmod(0o700)
        changed += 1
    for root, dirs, files in os.walk(path):  # os.walk does not follow symlinks into other places
        for name in dirs + files:
            changed += _tighten(Path(root) / name)
    if changed:
        log.event(logger, "data_dir.tightened", logging.WARNING, path=str(path), mode_was=oct(before),
                  entries=changed, now="directories 0700, files 0600 (owner only)")
    return path


def _tighten(entry: Path) -> int:
    try:
        st = entry.lstat()
    except FileNotFoundError:  # removed meanwhile (a -wal after a checkpoint, a temp file)
        return 0
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return 0  # a symlink has no mode of its own; this one is private already
    with contextlib.suppress(FileNotFoundError, PermissionError):
        entry.chmod(stat.S_IMODE(st.st_mode) & 0o700)
        return 1
    return 0


def private_file(path: Path) -> Path:
    """Make an existing `path` 0600 (a missing one is left alone). By path, never by opening it: closing any
    descriptor of an SQLite file would drop every POSIX lock this process holds on it (SQLite's "how to corrupt"
    list), and the stores open the file while other connections of this process may hold it."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    return path


def private_sqlite(path: Path) -> sqlite3.Connection:
    """Open (or create) the SQLite file `path` in a private directory, 0600 before anything is written to it; the
    -wal and -shm files SQLite makes later take the database file's mode (older ones are tightened here)."""
    private_dir(path.parent)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        private_file(path.with_name(name))
    return db


class DataKey:
    """The data directory's key (see the module's docstring)."""

    def __init__(self, secret: bytes, path: Path) -> None:
        self.path = path
        self._secret = secret
        self._aead = AESGCM(self.subkey("seal"))

    @classmethod
    def load(cls, data_dir: Path | str) -> DataKey:
        """The data dir's key, made on first use (concurrent processes agree: the first link wins)."""
        path = private_dir(data_dir).resolve() / KEY_FILE
        with _lock:
            if path in _keys:
                return _keys[path]
        if not path.exists():
            tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
            try:
                os.link(tmp, path)  # atomic: exactly one process's key becomes the key
                log.event(logger, "store.key_created", path=str(path))
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        try:
            secret = base64.b64decode(path.read_text().strip(), validate=True)
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise ConfigError(f"{path}: not a key made by the gateway (32 bytes, base64)")
        key = cls(secret, path)
        with _lock:
            return _keys.setdefault(path, key)

    def subkey(self, label: str) -> bytes:
        return hmac.new(self._secret, label.encode(), hashlib.sha256).digest()

    def mac(self, label: str, value: str) -> str:
        """A keyed hash (HMAC-SHA256 under the `label` sub-key), hex."""
        return hmac.new(self.subkey(label), value.encode(), hashlib.sha256).hexdigest()

    def seal(self, plain: str, context: str) -> str:
        """AES-256-GCM with a random 96-bit nonce; `context` (e.g. "room:ID:pin") is authenticated, not stored."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plain.encode(), context.encode())
        return SEALED + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, token: str, context: str) -> str:
        """The clear value of `seal`'s output; ConfigError when this key did not seal it (the key file was
        replaced or lost: restore DATA_DIR/store.key from the same backup as the database)."""
        body = token[len(SEALED):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, ValueError):
            raise ConfigError(f"{self.path}: a value sealed in the store ({context}) does not open with this key: "
                              "restore the key file that belongs to this data directory") from None

    def check(self) -> str:
        """A value the store keeps to tell, on open, that this is the key it was sealed with."""
        return self.mac("check", "store.key")[:16]


def sealed(value: str | None) -> bool:
    return value is not None and value.startswith(SEALED)
