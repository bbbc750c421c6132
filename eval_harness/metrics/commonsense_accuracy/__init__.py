"""Package marker so the metric script is installed with eval_harness (evaluate.load reads the .py file)."""
