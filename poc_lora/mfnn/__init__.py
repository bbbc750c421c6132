"""Mean-field two-layer networks trained by MFLD (the paper's theory experiments).

Modules: :mod:`.model` (neuron, predict, merge, prune), :mod:`.data` (double circle,
multi-index), :mod:`.mfld` (the noisy-gradient trainer), :mod:`.config` (the paper's
settings, YAML), :mod:`.experiments` (Figure 1, Figure 2, Table 2).

Example:
    >>> from poc_lora.mfnn import run_figure1
    >>> run_figure1("classification", output="results/mfnn")  # doctest: +SKIP
"""

from .experiments import main_mfnn, run_figure1, run_figure2, run_table2

__all__ = ["main_mfnn", "run_figure1", "run_figure2", "run_table2"]
