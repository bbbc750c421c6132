"""Test-session defaults: one intra-op CPU thread and passive OpenMP waiting, set before torch is
imported (the suite runs many small kernels; on a busy machine spin-waiting threads made it 5x
slower). A user's own OMP_NUM_THREADS still wins, as in the CLI."""

from __future__ import annotations

from poc_lora.runtime import configure_threads

configure_threads()
