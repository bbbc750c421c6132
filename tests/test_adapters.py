"""Adapter directory I/O: config checks, lazy reads, safe .bin loading, the streaming writer."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge import make_adapter, make_base

from poc_lora.adapters import check_output_not_input, load_adapter, resolve_adapter_dirs
from poc_lora.errors import AdapterError, OutputError
from poc_lora.safetensors_io import SafetensorsStreamWriter, TensorFile


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("ad")
    base = make_base(num_hidden_layers=2)
    path = make_adapter(root / "a", base, 5, r=3, lora_alpha=6, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "embed_tokens"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 9})
    return base, path


def test_scales_and_ranks_match_peft_layers(adapter):
    base, path = adapter
    ad = load_adapter(path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    inner = peft_model.base_model.model
    assert len(ad.modules) == 5
    for name, m in ad.modules.items():
        layer = inner.get_submodule(name)
        assert m.rank == layer.r["default"], name
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
    assert ad.modules["model.embed_tokens"].kind == "embedding"
    assert ad.modules["model.layers.0.self_attn.v_proj"].rank == 2
    ad.close()


def test_lazy_reads_equal_load_file_and_bin_equals_safetensors(adapter, tmp_path):
    _, path = adapter
    want = load_file(str(path / "adapter_model.safetensors"))
    tf = TensorFile(path / "adapter_model.safetensors", "x")
    assert set(tf.keys()) == set(want)
    for k, v in want.items():
        assert torch.equal(tf.read(k), v)
    tf.close()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(path / "adapter_config.json", legacy)
    torch.save(want, legacy / "adapter_model.bin")
    ad = load_adapter(legacy)
    assert ad.weight_file.name == "adapter_model.bin"
    for k, v in want.items():
        assert torch.equal(ad.read(k), v)
    ad.close()


def test_hostile_pickle_is_refused_and_runs_nothing(adapter, tmp_path):
    _, path = adapter
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "adapter_config.json", bad)
    torch.save({"x": torch.zeros(1), "payload": Payload()}, bad / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        load_adapter(bad, label="adapter bad")
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [("peft_type", "LOHA"), ("use_dora", True), ("kasa_config", {"r": 1}),
                                         ("use_qalora", True), ("r", 0)])
def test_config_refusals_name_adapter_and_field(adapter, tmp_path, field, value):
    _, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=field) as info:
        load_adapter(bad)
    assert str(bad) in str(info.value)


def test_rank_in_config_must_match_tensors(adapter, tmp_path):
    _, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="v_proj has rank 2 in its tensors but r=3"):
        load_adapter(bad)


def test_resolve_parent_directory_and_output_checks(adapter, tmp_path):
    _, path = adapter
    for name in ("b", "a"):
        shutil.copytree(path, tmp_path / "many" / name)
    (tmp_path / "many" / "notes").mkdir()
    assert resolve_adapter_dirs([tmp_path / "many"]) == [tmp_path / "many" / "a", tmp_path / "many" / "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="holds no adapter"):
        resolve_adapter_dirs([tmp_path / "empty"])
    with pytest.raises(OutputError):
        check_output_not_input(tmp_path / "many" / "a" / "out", [tmp_path / "many" / "a"])
    with pytest.raises(OutputError):
        check_output_not_input(tmp_path / "many", [tmp_path / "many" / "a"])
    check_output_not_input(tmp_path / "elsewhere", [tmp_path / "many" / "a"])


def test_stream_writer_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 3, generator=gen),
        "h": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    with SafetensorsStreamWriter(path, specs, {"format": "pt", "k": "v"}, background=True) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    with open(path, "rb") as fh:
        assert int.from_bytes(fh.read(8), "little") % 8 == 0


def test_stream_writer_refuses_wrong_order_shape_and_missing(tmp_path):
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(RuntimeError, match="out of order"):
        w.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="expected"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_safe_readers_for_other_commands(adapter, tmp_path):
    """read_adapter_config / load_adapter_state: the tensors equal safetensors' own reading, and
    every unreadable input is an AdapterError naming the file."""
    from poc_lora.adapters import load_adapter_state, read_adapter_config

    _, path = adapter
    assert read_adapter_config(path) == json.loads((path / "adapter_config.json").read_text())
    want = load_file(str(path / "adapter_model.safetensors"))
    got = load_adapter_state(path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "adapter_config.json").write_text("")
    with pytest.raises(AdapterError, match=f"{bad / 'adapter_config.json'} is empty"):
        read_adapter_config(bad)
    (bad / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(AdapterError, match=f"{bad / 'adapter_model.safetensors'} is not a valid safetensors"):
        load_adapter_state(bad)
    with pytest.raises(AdapterError, match="is a file, not an adapter directory"):
        read_adapter_config(bad / "adapter_model.safetensors")
