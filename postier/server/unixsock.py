"""Unix-domain listening sockets (LMTP's DATA_DIR/run/lmtp): the directory, stale files, the mode.

A Unix socket needs what a TCP port does not: its directory must exist, a socket file left by a
server that was killed must go before bind() (asyncio removes a stale *socket*, never another kind
of file, which stays an error), and the file's mode decides who may connect: 0660 as Dovecot's
lmtp socket, so the service user and its group (an MTA such as Postfix added to it) may deliver.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

#: (peer_ip, peer_port) of a client on a Unix socket: no address (Received then has no TCP-info).
LOCAL_PEER = ("", 0)

#: Who may connect: owner and group (Dovecot's default for its lmtp socket).
SOCKET_MODE = 0o660


def prepare(path: Path) -> str:
    """Create the socket's directory (0750) and refuse a non-socket file in its place."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return str(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a server that did not stop cleanly: nobody answers on it
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another server is listening on it")
    return str(path)


def finish(path: Path) -> None:
    """Give the bound socket its mode (bind() used the umask)."""
    os.chmod(path, SOCKET_MODE)
