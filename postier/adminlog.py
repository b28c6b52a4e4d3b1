"""The audit trail of admin commands that change mail or accounts (queue delete, queue retry, ...).

Each action is one log line, as Postfix's postsuper logs "ID: removed": on standard error (where an
admin running the command sees it) and to the system log (facility mail, as the server's own lines
under systemd) when /dev/log exists, naming who ran it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pwd
import sys

log = logging.getLogger("postier.admin")

SYSLOG_SOCKET = "/dev/log"


def _setup() -> None:
    if log.handlers:
        return
    log.setLevel(logging.INFO)
    log.propagate = False
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("postier: %(message)s"))
    log.addHandler(err)
    if os.path.exists(SYSLOG_SOCKET):
        try:
            sysl = logging.handlers.SysLogHandler(SYSLOG_SOCKET, logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError:
            return  # no syslog daemon listening: standard error is enough
        sysl.setFormatter(logging.Formatter("postier-admin: %(message)s"))
        log.addHandler(sysl)


def who() -> str:
    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def audit(action: str) -> None:
    """Log one admin action, with who ran it."""
    _setup()
    log.info("%s, by %s", action, who())
