"""A private network namespace for WebRTC tests (libnice, so Janus, gathers no candidate on loopback).

`network_namespace()` creates a namespace with `lo` up and one non-loopback interface (10.77.0.1/24, a `dummy`
or, on kernels without it, an `ifb` device), and moves the CALLING THREAD into it with setns(2): network
namespaces are per thread, and every process started from that thread (the gateway, Janus, chromedriver and
Chromium, sipp) inherits it, as do sockets the thread opens (Selenium's client, urllib). At exit the thread
goes back to its own namespace and the namespace is deleted. Needs root: skipped otherwise, except under
CI=true, where it fails (the browser tests must not vanish silently).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

CLONE_NEWNET = 0x40000000
ADDRESS = "10.77.0.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def require_root() -> None:
    if os.geteuid() != 0:
        reason = "WebRTC tests need root to create a network namespace (libnice skips loopback)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@contextlib.contextmanager
def network_namespace() -> Iterator[str]:
    """Run the calling thread inside a fresh namespace with 10.77.0.1 on a non-loopback interface."""
    require_root()
    name = f"gwtest-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    own = target = -1
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        try:
            _ip("-n", name, "link", "add", "web0", "type", "dummy")
        except subprocess.CalledProcessError:  # this kernel has no dummy module
            _ip("-n", name, "link", "add", "web0", "type", "ifb")
        _ip("-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "web0")
        _ip("-n", name, "link", "set", "web0", "up")
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        _setns(target)
        try:
            yield name
        finally:
            _setns(own)
    finally:
        for fd in (own, target):
            if fd >= 0:
                os.close(fd)
        _ip("netns", "del", name)
