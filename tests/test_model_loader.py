"""Loading model folders: config parsing, strict safetensors loading (single and
sharded), each refusal naming its cause, and the seeded random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model import ModelConfig, load_model, make_random_model
from kvtransfer.model.random_model import default_model_dir, random_config
from model_support import fresh_folder, nan_pool, paged_greedy, prompt, random_folder, random_model


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist") as e:
        load_model(tmp_path / "nowhere")
    assert e.value.op == "load_model"
    with pytest.raises(InvalidArgumentError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"architectures": ["GPT2LMHeadModel"]}', "unsupported architecture 'GPT2LMHeadModel'"),
    ('{"architectures": []}', "architectures"),
])
def test_bad_config_json(tmp_path: Path, text: str, message: str) -> None:
    folder = fresh_folder(tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        load_model(folder)


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "unsupported rope scaling type 'longrope'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"hidden_size": -4}, "'hidden_size' must be a positive integer"),
    ({"torch_dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_settings(tmp_path: Path, changes: dict, message: str) -> None:
    folder = fresh_folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(InvalidArgumentError, match=message):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    _edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InvalidArgumentError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*\[512, 256\]"):
        load_model(folder)


def test_misshaped_tensor_names_both_shapes(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    _edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 256)}))
    with pytest.raises(InvalidArgumentError,
                       match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[32, 256\].*\[64, 256\]"):
        load_model(folder)


def test_unexpected_tensor_is_refused_but_rotary_buffers_ignored(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    _edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    load_model(folder)
    _edit_weights(folder, lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(256)}))
    with pytest.raises(InvalidArgumentError, match=r"unexpected tensor 'model\.layers\.2\.input_layernorm"):
        load_model(folder)


def test_no_or_unreadable_weights(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InvalidArgumentError, match="no \\*.safetensors.*pytorch_model.bin"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_model(folder)


def test_sharded_weights_load_like_one_file(tmp_path: Path) -> None:
    sharded = random_folder(num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    tokens = prompt(20, seed=9)
    assert paged_greedy(load_model(sharded), tokens, 4)[0] == paged_greedy(random_model(), tokens, 4)[0]
    # A shard the index names must exist.
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in sharded.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgumentError, match="model-00009-of-00009.safetensors"):
        load_model(copy)


def test_config_spellings_and_sliding_windows() -> None:
    base = random_config("llama", num_hidden_layers=4)
    v4 = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5,
                                                            "factor": 2.0}})
    assert v4.rope == v5.rope and v4.rope.theta == 5e5 and v4.rope.kind == "linear"
    assert ModelConfig.from_dict({**base, "head_dim": 48}).head_dim == 48
    qwen = random_config("qwen2", num_hidden_layers=4, sliding_window=32, max_window_layers=2)
    assert ModelConfig.from_dict(qwen).sliding_windows == (None,) * 4      # use_sliding_window is off
    qwen["use_sliding_window"] = True
    assert ModelConfig.from_dict(qwen).sliding_windows == (None, None, 32, 32)
    mistral = ModelConfig.from_dict(random_config("mistral", num_hidden_layers=2, sliding_window=4096))
    assert mistral.sliding_windows == (4096, 4096) and not mistral.qkv_bias
    assert ModelConfig.from_dict(random_config("qwen2")).qkv_bias
    eos = ModelConfig.from_dict({**base, "eos_token_id": [7, 9]})
    assert eos.eos_token_ids == (7, 9)


def test_random_models_are_seeded(tmp_path: Path) -> None:
    a = make_random_model(tmp_path / "a", seed=1, num_hidden_layers=1)
    b = make_random_model(tmp_path / "b", seed=1, num_hidden_layers=1)
    c = make_random_model(tmp_path / "c", seed=2, num_hidden_layers=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(InvalidArgumentError, match="vocab_size 100"):
        make_random_model(tmp_path / "d", vocab_size=100)
    with pytest.raises(InvalidArgumentError, match="unknown arch 'gpt2'"):
        make_random_model(tmp_path / "e", arch="gpt2")


def test_default_model_dir_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTRANSFER_CACHE", str(tmp_path))
    folder = default_model_dir()
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]   # no temporary left
    model = load_model(folder)
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (4, 256, 8, 2, 32, 384)
    layout = model.kv_layout(4, 16)
    assert model.prefill([256, 72, 105], nan_pool(layout), layout, [3]).isfinite().all()
