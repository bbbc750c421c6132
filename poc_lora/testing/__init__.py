"""Test assets that also power the offline demo: the tiny Llama and its word-level tokenizer.

:mod:`.tiny_model` builds (and briefly pretrains, on the cue-word synthetic suites of
:mod:`poc_lora.data.synthetic`) the model behind the embedded id ``poc-lora/tiny-llama``.
The production loader (:mod:`poc_lora.models`) imports it to resolve that id; nothing here
imports the loader, so the edge goes one way (the layer contract in ``pyproject.toml``).
"""
