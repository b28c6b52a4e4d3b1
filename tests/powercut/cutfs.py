"""A FUSE passthrough filesystem that forgets, at unmount, everything POSIX does not promise to keep
across a power loss (the durability model of fsync(2) that LazyFS implements).

Run as `python -m tests.powercut.cutfs BACKING MOUNTPOINT STATE` (tests/powercut/mount.py does). Every
operation is passed through to BACKING; alongside, the filesystem keeps the *durable* state:

- a file's data is durable as it was at its last fsync/fdatasync (a new file never fsynced is empty);
- a directory's entries (creates, mkdirs, renames, links, unlinks, rmdirs inside it) are durable as
  they were at its last fsync;
- what existed at mount time is durable.

Unmounting is the power cut: BACKING is rebuilt from the durable state (the durable tree from the
root, each file with its durable content), and the process exits. The next mount starts from there.
Metadata (modes, times, owners) is kept as it is: the model is about data and names.

Why our own: LazyFS (C++, not in Debian) is the reference; this is the same model in ~300 lines on
mfusepy (ctypes over Debian's libfuse3), small enough to read in full and unit-tested on its own
(tests/powercut/test_cutfs.py). Durable file contents are kept in STATE: a file is copied there before
its first change (then only the byte ranges written since the last fsync are copied at each fsync).

Mount options: page cache on (not direct_io) with `kernel_cache`, so that SQLite's WAL index (-shm),
which SQLite maps with mmap(MAP_SHARED), works and stays coherent between processes; POSIX and BSD
locks are left to the kernel (no lock/flock handlers: the kernel then locks locally, which is right
for a single machine); `hard_remove` so that an unlinked open file is gone from the directory at
once (libfuse would otherwise rename it to .fuse_hidden*, a name that would then be durable).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import sys
import threading
from typing import Any

import mfusepy as fuse  # type: ignore[import-untyped]

EMPTY, ORIG, IMAGE = 0, 1, 2  # where a file's durable content is: nothing, its backing file, STATE/<id>


class Node:
    """An inode: a directory (current and durable entries), a file (durable content, unsynced ranges)
    or a symbolic link."""

    __slots__ = ("blob", "children", "dirty", "durable", "id", "kind", "mode", "target", "trunc")

    def __init__(self, nid: int, kind: str, mode: int) -> None:
        self.id = nid
        self.kind = kind  # "d", "f" or "l"
        self.mode = mode
        self.children: dict[str, Node] = {}
        self.durable: dict[str, Node] = {}
        self.blob = EMPTY
        self.dirty: list[tuple[int, int]] = []
        self.trunc: int | None = None
        self.target = ""


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, end in sorted((o, o + n) for o, n in ranges):
        if out and off <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((off, end))
    return out


class CutFS(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, backing: str, state: str) -> None:
        self.backing = os.path.abspath(backing)
        self.state = os.path.abspath(state)
        shutil.rmtree(self.state, ignore_errors=True)
        os.makedirs(self.state)
        self.mutex = threading.RLock()
        self.ids = itertools.count(1)
        self.fds: dict[int, Node] = {}
        self.root = self._scan(self.backing, {})

    # -- the model ------------------------------------------------------------------------------

    def _scan(self, path: str, seen: dict[int, Node]) -> Node:
        st = os.lstat(path)
        if st.st_ino in seen:  # a hard link
            return seen[st.st_ino]
        if stat.S_ISDIR(st.st_mode):
            node = Node(next(self.ids), "d", st.st_mode)
            for name in os.listdir(path):
                node.children[name] = self._scan(os.path.join(path, name), seen)
            node.durable = dict(node.children)
        elif stat.S_ISLNK(st.st_mode):
            node = Node(next(self.ids), "l", st.st_mode)
            node.target = os.readlink(path)
        else:
            node = Node(next(self.ids), "f", st.st_mode)
            node.blob = ORIG
        seen[st.st_ino] = node
        return node

    def _b(self, path: str) -> str:
        return self.backing + path

    def _img(self, node: Node) -> str:
        return os.path.join(self.state, str(node.id))

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in path.split("/"):
            if part:
                try:
                    node = node.children[part]
                except KeyError:
                    raise fuse.FuseOSError(errno.ENOENT) from None
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, name = path.rsplit("/", 1)
        return self._lookup(head), name

    def _preserve(self, node: Node, source: str | int) -> None:
        """Before a file's first change: its content as of mount time goes to STATE."""
        if node.kind != "f" or node.blob != ORIG:
            return
        dst = self._img(node)
        if isinstance(source, str):
            shutil.copyfile(source, dst)
        else:
            with open(dst, "wb") as out:
                off = 0
                while chunk := os.pread(source, 1 << 20, off):
                    out.write(chunk)
                    off += len(chunk)
        node.blob = IMAGE

    def _sync_file(self, node: Node, fd: int) -> None:
        """fsync: the file's current content becomes its durable content."""
        if node.blob == ORIG:
            return  # never changed since mount
        img = self._img(node)
        if node.blob == EMPTY:
            open(img, "wb").close()
            node.blob = IMAGE
        with open(img, "r+b") as out:
            if node.trunc is not None:
                out.truncate(min(node.trunc, os.fstat(out.fileno()).st_size))
            for off, end in _merge(node.dirty):
                data = os.pread(fd, end - off, off)
                out.seek(off)
                out.write(data)
            out.truncate(os.fstat(fd).st_size)
        node.dirty = []
        node.trunc = None

    # -- FUSE operations --------------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            config_3.hard_remove = 1
            config_3.kernel_cache = 1

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if path is None and fh is not None else os.lstat(self._b(path or "/"))
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                "st_blksize", "st_rdev")
        out: dict[str, Any] = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._b(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._b(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._b(path))
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def chmod(self, path: str | None, mode: int) -> int:
        if path is not None:
            os.chmod(self._b(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        if path is not None:
            os.lchown(self._b(path), uid, gid)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path is not None:
            os.utime(self._b(path), ns=times, follow_symlinks=False) if times else os.utime(self._b(path))
        return 0

    def _open(self, node: Node, fd: int, flags: int) -> int:
        self.fds[fd] = node
        if flags & os.O_TRUNC:
            self._truncate(node, fd, 0)
        return fd

    def create(self, path: str, mode: int, flags: int) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            fd = os.open(self._b(path), (flags & ~(os.O_APPEND | os.O_ACCMODE | os.O_TRUNC)) | os.O_RDWR
                         | os.O_CREAT, mode)
            node = parent.children.get(name)
            if node is None or node.kind != "f":
                node = Node(next(self.ids), "f", mode)
                parent.children[name] = node
            return self._open(node, fd, flags)

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            node = self._lookup(path)
            fd = os.open(self._b(path), (flags & ~(os.O_APPEND | os.O_ACCMODE | os.O_TRUNC | os.O_CREAT
                                                   | os.O_EXCL)) | os.O_RDWR)
            return self._open(node, fd, flags)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            node = self.fds[fh]
            self._preserve(node, fh)
            n = os.pwrite(fh, data, offset)
            node.dirty.append((offset, n))
            return n

    def _truncate(self, node: Node, fd: int, length: int) -> None:
        self._preserve(node, fd)
        os.ftruncate(fd, length)
        node.trunc = length if node.trunc is None else min(node.trunc, length)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self.mutex:
            if fh is not None and fh in self.fds:
                self._truncate(self.fds[fh], fh, length)
            else:
                assert path is not None
                fd = os.open(self._b(path), os.O_RDWR)
                try:
                    self._truncate(self._lookup(path), fd, length)
                finally:
                    os.close(fd)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self.mutex:
            self._sync_file(self.fds[fh], fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        with self.mutex:
            self.fds.pop(fh, None)
            os.close(fh)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        if path is None:
            return 0  # a removed directory: nothing in it can be durable
        with self.mutex:
            node = self._lookup(path)
            node.durable = dict(node.children)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            os.mkdir(self._b(path), mode)
            parent.children[name] = Node(next(self.ids), "d", mode | stat.S_IFDIR)
        return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            os.rmdir(self._b(path))
            parent.children.pop(name, None)
        return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            node = parent.children.get(name)
            if node is not None:
                self._preserve(node, self._b(path))
            os.unlink(self._b(path))
            parent.children.pop(name, None)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            sp, sname = self._parent(old)
            dp, dname = self._parent(new)
            node = sp.children[sname]
            over = dp.children.get(dname)
            if over is node:
                return 0  # rename(2) between two links of one file does nothing
            if over is not None:
                self._preserve(over, self._b(new))
            os.rename(self._b(old), self._b(new))
            del sp.children[sname]
            dp.children[dname] = node
        return 0

    def link(self, target: str, source: str) -> int:
        with self.mutex:
            node = self._lookup(source)
            parent, name = self._parent(target)
            os.link(self._b(source), self._b(target))
            parent.children[name] = node
        return 0

    def symlink(self, target: str, source: str) -> int:
        with self.mutex:
            parent, name = self._parent(target)
            os.symlink(source, self._b(target))
            node = Node(next(self.ids), "l", stat.S_IFLNK | 0o777)
            node.target = source
            parent.children[name] = node
        return 0

    # -- the power cut ----------------------------------------------------------------------------

    def cut(self) -> dict[str, int]:
        """Rebuild BACKING as the durable state (run after unmounting). Returns counts for the log."""
        where: dict[int, str] = {}  # unchanged files: where their content is now

        def locate(node: Node, path: str) -> None:
            for name, child in node.children.items():
                p = os.path.join(path, name)
                if child.kind == "d":
                    locate(child, p)
                elif child.kind == "f" and child.blob == ORIG:
                    where.setdefault(child.id, p)

        locate(self.root, self.backing)
        new = self.backing + ".cut"
        shutil.rmtree(new, ignore_errors=True)
        os.mkdir(new)
        made: dict[int, str] = {}
        counts = {"dirs": 0, "files": 0}

        def build(node: Node, dst: str, stack: frozenset[int]) -> None:
            for name, child in node.durable.items():
                p = os.path.join(dst, name)
                if child.kind == "d":
                    if child.id in stack:
                        continue
                    os.mkdir(p, stat.S_IMODE(child.mode))
                    counts["dirs"] += 1
                    build(child, p, stack | {child.id})
                elif child.kind == "l":
                    os.symlink(child.target, p)
                elif child.id in made:
                    os.link(made[child.id], p)
                else:
                    if child.blob == EMPTY:
                        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(child.mode)))
                    else:
                        os.link(self._img(child) if child.blob == IMAGE else where[child.id], p)
                    made[child.id] = p
                    counts["files"] += 1

        build(self.root, new, frozenset({self.root.id}))
        old = self.backing + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.mkdir(old)
        for name in os.listdir(self.backing):
            os.rename(os.path.join(self.backing, name), os.path.join(old, name))
        for name in os.listdir(new):
            os.rename(os.path.join(new, name), os.path.join(self.backing, name))
        shutil.rmtree(old)
        os.rmdir(new)
        shutil.rmtree(self.state)
        return counts


def main(argv: list[str]) -> int:
    backing, mountpoint, state = argv
    ops = CutFS(backing, state)
    fuse.FUSE(ops, mountpoint, foreground=True, fsname="cutfs")
    counts = ops.cut()
    print(f"cutfs: power cut; durable: {counts['dirs']} directories, {counts['files']} files", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
