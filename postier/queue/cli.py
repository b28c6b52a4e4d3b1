"""`postier queue list | show ID | retry ID|--all | delete ID`: inspect and steer the outbound queue.

Works on the spool database directly (in cluster mode, the cluster's queue in PostgreSQL), so it
works whether or not the server runs; a running server
notices `retry` within its poll interval (a few seconds). `delete` removes a message without a DSN.
"""

from __future__ import annotations

import argparse
import datetime
import time

from ..adminlog import audit
from .cluster import open_spool
from .spool import QUEUED, QueueSpool, valid_id


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _spool(args: argparse.Namespace) -> QueueSpool:
    from ..cli import _load

    return open_spool(_load(args))


def _id(args: argparse.Namespace) -> str:
    from ..cli import CLIError

    if not args.id:
        raise CLIError(f"usage: queue {args.action} ID")
    msg_id = str(args.id).upper()
    if not valid_id(msg_id):
        raise CLIError(f"not a queue id: {args.id!r}")
    return msg_id


def cmd_queue(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    spool = _spool(args)
    try:
        if args.action == "list":
            rows = spool.list_messages()
            for info, rcpts in rows:
                print(f"{info.id}  {info.size:>9}  {_when(info.created)}  <{info.sender}>")
                for r in rcpts:
                    detail = f"next {_when(r.next_attempt)}" if r.status == QUEUED else r.status
                    reply = f"  ({r.last_reply})" if r.last_reply else ""
                    print(f"    {r.address}  {detail}{reply}")
            print(f"-- {len(rows)} message{'s' if len(rows) != 1 else ''} in the queue")
        elif args.action == "show":
            msg_id = _id(args)
            found = spool.message(msg_id)
            if found is None:
                raise CLIError(f"no such message in the queue: {msg_id}")
            info = found
            print(f"id:       {info.id}")
            print(f"sender:   <{info.sender}>")
            print(f"arrival:  {_when(info.created)}")
            print(f"size:     {info.size}")
            if info.user:
                print(f"user:     {info.user}")
            flags = [f for f, on in (("SMTPUTF8", info.smtputf8), ("8BITMIME", info.eightbit)) if on]
            if info.ret or info.envid or flags:
                print(f"options:  {' '.join(flags)} RET={info.ret or '-'} ENVID={info.envid or '-'}")
            print("recipients:")
            for r in spool.recipients(msg_id):
                nxt = f", next attempt {_when(r.next_attempt)}" if r.status == QUEUED else ""
                print(f"  {r.address}: {r.status}, {r.attempts} attempt{'s' if r.attempts != 1 else ''}{nxt}")
                if r.last_reply:
                    print(f"    last: {r.last_reply}")
            attempts = spool.attempts(msg_id)
            if attempts:
                print("attempts:")
                for a in attempts:
                    print(f"  {_when(a.time)}  {a.address}  via {a.mx or '-'}  tls={a.tls or 'none'}")
                    print(f"    {a.reply}")
        elif args.action == "retry":
            if args.all:
                n = spool.retry(None, time.time())
                audit(f"queue retry --all: {n} recipient{'s' if n != 1 else ''} rescheduled")
            else:
                msg_id = _id(args)
                if spool.message(msg_id) is None:
                    raise CLIError(f"no such message in the queue: {msg_id}")
                n = spool.retry(msg_id, time.time())
                audit(f"queue retry {msg_id}: {n} recipient{'s' if n != 1 else ''} rescheduled")
            print(f"{n} recipient{'s' if n != 1 else ''} scheduled for immediate delivery")
        elif args.action == "delete":
            msg_id = _id(args)
            found = spool.message(msg_id)
            pending = [r.address for r in spool.recipients(msg_id) if r.status == QUEUED] if found else []
            if found is None or not spool.delete(msg_id):
                raise CLIError(f"no such message in the queue: {msg_id}")
            audit(f"queue delete {msg_id}: removed without a DSN, from <{found.sender}>, "
                  f"{len(pending)} undelivered recipient{'s' if len(pending) != 1 else ''} ({', '.join(pending[:10])})")
            print(f"deleted {msg_id}")
    finally:
        spool.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("queue", help="inspect and manage the outbound queue")
    p.add_argument("action", choices=("list", "show", "retry", "delete"))
    p.add_argument("id", nargs="?", help="queue id (from `queue list`)")
    p.add_argument("--all", action="store_true", help="retry: every queued message")
    p.set_defaults(func=cmd_queue)
