"""Test-session defaults: one intra-op CPU thread and passive OpenMP waiting, set before torch is
imported (the suite runs many small kernels; on a busy machine spin-waiting threads made it 5x
slower). A user's own OMP_NUM_THREADS still wins, as in the CLI."""

from __future__ import annotations

import pytest

from poc_lora.runtime import configure_threads

configure_threads()


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A private cache (``POC_LORA_CACHE``) for the tiny model and the synthetic data, one per test
    module (subprocesses inherit it); use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POC_LORA_CACHE", str(path))
        yield path
