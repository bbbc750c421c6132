"""Test-session defaults: one intra-op CPU thread and passive OpenMP waiting, set before torch is
imported. The CLI's default is every available core, but the suite runs many small kernels on a
tiny model, where a second thread only adds synchronisation (and on a busy machine spin-waiting
threads made it 5x slower). A user's own OMP_NUM_THREADS still wins, as in the CLI."""

from __future__ import annotations

import os

from poc_lora.runtime import configure_threads

configure_threads(None if os.environ.get("OMP_NUM_THREADS") else 1)
