"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 §3) as pure functions over ``SortItem``s.

Written here because no maintained library implements RFC 5256's variant of the Zawinski
algorithm. Input: the messages that matched the search criteria, each with its ``SortFields``
(``sorting.sort_fields``); output: a list of ``ThreadNode`` trees (``id`` None for a dummy
parent), which ``proto.imap.response.thread`` serialises. Ties in date order keep mailbox order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .sorting import SortItem, casemap

__all__ = ["ThreadNode", "thread_orderedsubject", "thread_references"]

_MAX_REFERENCES = 1000


@dataclass(eq=False, slots=True)
class ThreadNode:
    """A message (``item``; None for a dummy standing in for a missing one) and its replies."""

    item: SortItem | None = None
    children: list[ThreadNode] = field(default_factory=list)
    parent: ThreadNode | None = field(default=None, repr=False)

    @property
    def id(self) -> int | None:
        return None if self.item is None else self.item.id

    def first(self) -> SortItem | None:
        """The message that stands for this node when sorting: itself, or a dummy's first child."""
        node: ThreadNode | None = self
        while node is not None and node.item is None:
            node = node.children[0] if node.children else None
        return None if node is None else node.item


def _date_key(node: ThreadNode) -> tuple[float, int]:
    item = node.first()
    return (0.0, 0) if item is None else (item.sent.timestamp(), item.seq)


# -- ORDEREDSUBJECT ------------------------------------------------------------------------------------

def thread_orderedsubject(items: Sequence[SortItem]) -> list[ThreadNode]:
    """RFC 5256 §3 ORDEREDSUBJECT: by base subject then sent date; each group one thread whose first
    message is the parent of all the others; threads in the sent date order of their parents."""
    groups: dict[str, ThreadNode] = {}
    for item in sorted(items, key=lambda i: (casemap(i.fields.subject), i.sent.timestamp(), i.seq)):
        key = casemap(item.fields.subject)
        root = groups.get(key)
        if root is None:
            groups[key] = ThreadNode(item)
        else:
            root.children.append(ThreadNode(item, parent=root))
    return sorted(groups.values(), key=_date_key)


# -- REFERENCES ----------------------------------------------------------------------------------------

def _is_ancestor(node: ThreadNode, of: ThreadNode) -> bool:
    """True if ``node`` is ``of`` or one of its ancestors (a link would make a loop)."""
    if not node.children:
        return node is of  # a leaf is nobody's ancestor: no walk up a long chain
    cur: ThreadNode | None = of
    while cur is not None:
        if cur is node:
            return True
        cur = cur.parent
    return False


def _link(parent: ThreadNode, child: ThreadNode) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def _deepest_first(roots: list[ThreadNode]) -> list[ThreadNode]:
    """Every node below ``roots``, each after all of its descendants (no recursion: chains of
    replies can be thousands deep)."""
    order: list[ThreadNode] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    order.reverse()
    return order


def _prune_level(siblings: list[ThreadNode], at_root: bool) -> list[ThreadNode]:
    """RFC 5256 §3 step 3 on one set of siblings (their own children already pruned): drop dummies
    without children; replace a dummy by its children, except that several children are not
    promoted to the root level."""
    out: list[ThreadNode] = []
    for node in siblings:
        if node.item is not None or (at_root and len(node.children) > 1):
            out.append(node)
        else:
            out.extend(node.children)
    return out


def _prune(roots: list[ThreadNode]) -> list[ThreadNode]:
    for node in _deepest_first(roots):
        node.children = _prune_level(node.children, False)
        for c in node.children:
            c.parent = node
    out = _prune_level(roots, True)
    for r in out:
        r.parent = None
    return out


def _sort_tree(roots: list[ThreadNode]) -> None:
    """Step 6: every set of siblings by sent date, the deepest first (a dummy by its first child)."""
    for node in _deepest_first(roots):
        node.children.sort(key=_date_key)
    roots.sort(key=_date_key)


def thread_references(items: Sequence[SortItem]) -> list[ThreadNode]:
    """RFC 5256 §3 REFERENCES (the Zawinski algorithm as the RFC states it)."""
    by_id: dict[str, ThreadNode] = {}
    nodes: list[ThreadNode] = []
    ordered = sorted(items, key=lambda i: i.seq)
    # step 1: one container per message; a missing or duplicate Message-ID gets a unique one
    own: list[tuple[ThreadNode, SortItem]] = []
    for item in ordered:
        mid = item.fields.message_id
        node = by_id.get(mid) if mid is not None else None
        if node is None or node.item is not None:
            node = ThreadNode(item)
            if mid is not None and mid not in by_id:
                by_id[mid] = node
        else:
            node.item = item  # a dummy made earlier for this id (referenced before it was seen)
        nodes.append(node)
        own.append((node, item))

    def container(mid: str) -> ThreadNode:
        node = by_id.get(mid)
        if node is None:
            node = by_id[mid] = ThreadNode()
            nodes.append(node)
        return node

    for node, item in own:
        refs = [container(r) for r in item.fields.references[:_MAX_REFERENCES]]
        # 1A: link the references in order, keeping existing parents and never making a loop
        for parent, child in zip(refs, refs[1:], strict=False):
            if child.parent is None and not _is_ancestor(child, parent):
                _link(parent, child)
        # 1B: the last reference is the message's parent (the newest information wins)
        last = refs[-1] if refs else None
        if last is not None and last is not node and not _is_ancestor(node, last):
            _link(last, node)
        elif last is None and node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None

    roots = _prune(list(dict.fromkeys(n for n in nodes if n.parent is None)))  # steps 2 and 3
    for r in roots:
        if r.item is None:
            r.children.sort(key=_date_key)
    roots.sort(key=_date_key)  # step 4
    roots = _merge_subjects(roots)  # step 5
    _sort_tree(roots)  # step 6
    return roots


def _merge_subjects(roots: list[ThreadNode]) -> list[ThreadNode]:
    """RFC 5256 §3 step 5: gather the top-level threads that share a base subject."""

    def subject(node: ThreadNode) -> tuple[str, bool]:
        item = node.item if node.item is not None else (node.children[0].item if node.children else None)
        return ("", False) if item is None else (casemap(item.fields.subject), item.fields.is_reply)

    def is_reply(node: ThreadNode) -> bool:
        return node.item is not None and node.item.fields.is_reply

    table: dict[str, ThreadNode] = {}
    for node in roots:  # 5B
        subj, _ = subject(node)
        if not subj:
            continue
        old = table.get(subj)
        if old is None or (old.item is not None and (node.item is None or (is_reply(old) and not is_reply(node)))):
            table[subj] = node
    out: list[ThreadNode] = []
    for node in roots:  # 5C
        subj, _ = subject(node)
        old = table.get(subj) if subj else None
        if old is None or old is node:
            out.append(node)
            continue
        if old.item is None and node.item is None:
            for c in list(node.children):
                _link(old, c)
        elif old.item is None or (is_reply(node) and not is_reply(old)):
            _link(old, node)  # under the dummy, or a reply under the original
        else:
            dummy = ThreadNode()
            index = next((k for k, n in enumerate(out) if n is old), None)
            _link(dummy, old)
            _link(dummy, node)
            table[subj] = dummy
            if index is not None:
                out[index] = dummy
            else:
                roots[roots.index(old)] = dummy  # not reached yet: it is replaced where it stands
    return out
