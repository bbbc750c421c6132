"""Test-session defaults: one intra-op CPU thread and passive OpenMP waiting, set before torch is
imported. The CLI's default is every available core, but the suite runs many small kernels on a
tiny model, where a second thread only adds synchronisation (and on a busy machine spin-waiting
threads made it 5x slower). A user's own OMP_NUM_THREADS still wins, as in the CLI."""

from __future__ import annotations

import os

import pytest

from poc_lora.runtime import configure_threads

configure_threads(None if os.environ.get("OMP_NUM_THREADS") else 1)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A private cache (``POC_LORA_CACHE``) for the tiny model and the synthetic data, one per test
    module (subprocesses inherit it); use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POC_LORA_CACHE", str(path))
        yield path
