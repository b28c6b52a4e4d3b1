"""pipeline/sieve.py `_Watched`: ManageSieve's and the web settings' view of a user's scripts, whose
every write (also a failed one) makes the filter forget the scripts it remembered."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from postier.pipeline.sieve import _Watched
from postier.store.sieve import Scripts, ScriptError, ScriptStore

READS = {"active", "list", "get", "have_space", "active_script"}  # go through __getattr__


def test_every_write_of_scripts_is_watched() -> None:
    """A method added to `Scripts` must be classed here: a read, or a write `_Watched` defines."""
    methods = {n for n, _v in inspect.getmembers(Scripts, inspect.isfunction) if not n.startswith("_")}
    writes = methods - READS
    assert writes == {"put", "delete", "rename", "set_active"}
    assert all(n in vars(_Watched) for n in writes)
    assert not READS & set(vars(_Watched))


def test_reads_pass_through_and_writes_forget(tmp_path: Path) -> None:
    changes: list[int] = []
    w: Scripts = _Watched(ScriptStore(tmp_path / "sieve", max_script_size=1000), lambda: changes.append(1))
    assert w.max_script_size == 1000 and w.active_script() is None
    w.put("one", b"keep;")
    w.set_active("one")
    w.rename("one", "two")
    assert (w.active(), w.get("two"), w.list(), len(changes)) == ("two", b"keep;", [("two", True)], 3)
    with pytest.raises(ScriptError):
        w.put("bad/name", b"keep;")  # refused: forgets all the same (a write may fail part way)
    w.set_active("")
    w.delete("two")
    assert w.list() == [] and len(changes) == 6
