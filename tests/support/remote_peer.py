"""A stdlib-only peer for the remote tests: a ``Client`` or a ``Listener``, run by any Python.

It imports nothing but the standard library, so the tests can run it with another
interpreter (an md5-only Python before 3.12, a negotiated-digest one after) and prove
that the handshake interoperates with it. It also holds child-process targets.

    python remote_peer.py client HOST PORT AUTHKEY_HEX
        Connect, send ``("hello", version)``, print the reply's repr, send the bytes
        ``b"bye"``, close.
    python remote_peer.py server AUTHKEY_HEX
        Listen on 127.0.0.1, print ``PORT``, accept one connection, answer each message
        ``m`` with ``("echo", m, version)`` until EOF.

Either prints ``AuthenticationError`` and exits with code 3 if the handshake fails.
"""

from __future__ import annotations

import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener

AUTH_FAILED = 3


def version() -> tuple[int, int]:
    return (sys.version_info[0], sys.version_info[1])


def run_client(host: str, port: int, authkey: bytes) -> int:
    try:
        conn = Client((host, port), authkey=authkey)
    except AuthenticationError:
        print("AuthenticationError", flush=True)
        return AUTH_FAILED
    with conn:
        conn.send(("hello", version()))
        print(repr(conn.recv()), flush=True)
        conn.send_bytes(b"bye")
    return 0


def run_server(authkey: bytes) -> int:
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        print(listener.address[1], flush=True)
        try:
            conn = listener.accept()
        except AuthenticationError:
            print("AuthenticationError", flush=True)
            return AUTH_FAILED
        with conn:
            while True:
                try:
                    msg = conn.recv()
                except EOFError:
                    return 0
                conn.send(("echo", msg, version()))


def wait_for_eof(conn: Connection) -> None:
    """Child target: say ``b"ready"``, then block until the parent closes its end."""
    conn.send_bytes(b"ready")
    try:
        conn.recv_bytes()
    except EOFError:
        pass
    conn.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"] and len(argv) == 4:
        return run_client(argv[1], int(argv[2]), bytes.fromhex(argv[3]))
    if argv[:1] == ["server"] and len(argv) == 2:
        return run_server(bytes.fromhex(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
