"""The package's namespace: what ``import asyncmp`` offers is the public API and nothing else."""

from __future__ import annotations

import asyncmp


def test_dir_shows_exactly_the_public_names() -> None:
    # Private modules and dunders start with an underscore; anything else is a promise.
    public = {name for name in dir(asyncmp) if not name.startswith("_")}
    assert public == set(asyncmp.__all__)


def test_every_name_in_all_exists_once() -> None:
    assert len(asyncmp.__all__) == len(set(asyncmp.__all__))
    missing = [name for name in asyncmp.__all__ if not hasattr(asyncmp, name)]
    assert missing == []


def test_shared_is_public() -> None:
    assert "shared" in asyncmp.__all__ and "SharedMemoryError" in asyncmp.__all__
    assert issubclass(asyncmp.SharedMemoryError, asyncmp.AsyncmpError)
    # shared()'s docstring names the threshold: it is public too.
    assert "SHARED_THRESHOLD" in asyncmp.__all__
    assert asyncmp.SHARED_THRESHOLD == 1024 * 1024
