"""Tests run without the network: only loopback (and this machine's own name) can be reached.

Imported by tests/conftest.py for the pytest process, and loaded by Python itself as `sitecustomize`
in every subprocess a test starts (conftest puts this folder first on PYTHONPATH), so a script run
by a test cannot reach the internet either. A test that needs a server opens its own on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket

_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(host: object) -> bool:
    if isinstance(host, bytes | bytearray):
        host = host.decode("ascii", errors="replace")
    if host is None:
        return True
    if not isinstance(host, str):
        return False
    if host in ("", "localhost", "localhost.localdomain", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: object) -> OSError:
    return socket.gaierror(socket.EAI_NONAME, f"network disabled in tests: {what} is not loopback")


def _getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
    if not _is_local(host):
        raise _refuse(host)
    return _real_getaddrinfo(host, *args, **kwargs)


def _address_is_local(sock: socket.socket, address: object) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # Unix sockets and the like never leave the machine
    return isinstance(address, tuple) and _is_local(address[0])


def _connect(self: socket.socket, address: object) -> None:
    if not _address_is_local(self, address):
        raise ConnectionRefusedError(f"network disabled in tests: {address} is not loopback")
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: object) -> int:
    if not _address_is_local(self, address):
        raise ConnectionRefusedError(f"network disabled in tests: {address} is not loopback")
    return _real_connect_ex(self, address)


def install() -> None:
    socket.getaddrinfo = _getaddrinfo
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex


install()
