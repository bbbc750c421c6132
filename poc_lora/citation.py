"""The paper this project implements, cited one way everywhere (model cards, the evaluate metric).

Nitanda, Lee, Kai, Sakaguchi, Suzuki, "Propagation of Chaos for Mean-Field Langevin Dynamics and
its Application to Model Ensemble", ICML 2025, arXiv:2502.05784.
"""

PAPER = "Nitanda et al., ICML 2025, arXiv:2502.05784"
PAPER_URL = "https://arxiv.org/abs/2502.05784"
BIBTEX = """@inproceedings{nitanda2025poc,
  title         = {Propagation of Chaos for Mean-Field Langevin Dynamics and its Application to Model Ensemble},
  author        = {Nitanda and Lee and Kai and Sakaguchi and Suzuki},
  booktitle     = {International Conference on Machine Learning (ICML)},
  year          = {2025},
  eprint        = {2502.05784},
  archivePrefix = {arXiv}
}"""
