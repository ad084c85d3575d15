"""ModelConfig: validation names the field, presets have the intended sizes, counts match the real module."""

import json

import pytest
import torch

from model.config import PRESETS, ModelConfig, default_ffn_hidden
from model.llama import Llama


def test_bad_shapes_fail_naming_the_field():
    with pytest.raises(ValueError, match=r"n_heads=4 must be divisible by ModelConfig\.n_kv_heads=3"):
        ModelConfig(vocab_size=32, n_layers=1, d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"d_model=64 must be divisible by ModelConfig\.n_heads=6"):
        ModelConfig(vocab_size=32, n_layers=1, d_model=64, n_heads=6)
    with pytest.raises(ValueError, match=r"head_dim = 3 must be even"):
        ModelConfig(vocab_size=32, n_layers=1, d_model=12, n_heads=4)
    with pytest.raises(ValueError, match=r"ModelConfig\.n_layers must be positive"):
        ModelConfig(vocab_size=32, n_layers=0, d_model=64, n_heads=4)
    with pytest.raises(ValueError, match=r"ModelConfig\.dropout"):
        ModelConfig(vocab_size=32, n_layers=1, d_model=64, n_heads=4, dropout=1.0)
    with pytest.raises(TypeError, match=r"ModelConfig\.n_layers must be an int"):
        ModelConfig(vocab_size=32, n_layers="2", d_model=64, n_heads=4)
    with pytest.raises(TypeError, match=r"ModelConfig\.tie_embeddings must be true/false"):
        ModelConfig(vocab_size=32, n_layers=1, d_model=64, n_heads=4, tie_embeddings=1)


def test_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig.from_preset("tiny")
    d = json.loads(json.dumps(cfg.to_dict()))  # through JSON, where 10000.0 may come back as an int
    d["rope_theta"] = int(d["rope_theta"])
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown ModelConfig key\(s\) \['n_head'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_head": 4})
    with pytest.raises(ValueError, match=r"missing ModelConfig key\(s\) \['vocab_size'\]"):
        ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "vocab_size"})


def test_presets_and_overrides():
    assert set(PRESETS) == {"tiny", "small", "125m", "1b", "7b"}
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown ModelConfig override\(s\) \['layers'\]"):
        ModelConfig.from_preset("tiny", layers=3)
    cfg = ModelConfig.from_preset("small", vocab_size=8192, d_model=320)
    assert cfg.vocab_size == 8192 and cfg.ffn_hidden == default_ffn_hidden(320) == 896  # 8/3*320 = 853 -> 896
    assert ModelConfig.from_preset("125m", n_heads=8).n_kv_heads == 8  # MHA stays MHA
    assert default_ffn_hidden(64) == 192 and default_ffn_hidden(768) == 2048 and default_ffn_hidden(256) == 704


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_module(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # shapes only: the 7b preset costs nothing
        model = Llama(cfg)
    assert model.num_params() == cfg.n_params()
    assert cfg.head_dim * cfg.n_heads == cfg.d_model


def test_preset_sizes():
    millions = {name: cfg.n_params() / 1e6 for name, cfg in PRESETS.items()}
    assert millions["tiny"] < 1
    assert 3 < millions["small"] < 10
    assert 100 < millions["125m"] < 135
    assert 900 < millions["1b"] < 1300
    assert 6500 < millions["7b"] < 7500
    assert PRESETS["7b"].n_layers == 32 and PRESETS["7b"].n_kv_heads == 8 and PRESETS["7b"].max_seq_len == 4096
    assert PRESETS["1b"].n_layers == 16 and PRESETS["1b"].d_model == 2048 and PRESETS["1b"].n_kv_heads == 8


def test_flops_per_token_hand_computed():
    cfg = PRESETS["tiny"]  # V 512, L 2, d 64, 4 heads / 2 KV heads (kv width 32), ffn 192, tied
    # per layer: q,o 2*64*64 + k,v 2*64*32 = 12288 ; ffn 3*64*192 = 36864 ; norms 128 -> 49280
    # total: 2*49280 + final norm 64 + embedding 512*64 = 131392
    assert cfg.n_params() == 131392
    # matmul params: everything but the lookup (98624) + the tied lm_head (32768) = 131392
    # 6N = 788352 ; attention 12 * L * d * T = 12 * 2 * 64 * 128 = 196608
    assert cfg.flops_per_token(128) == 788352 + 196608
    untied = cfg.replace(tie_embeddings=False)
    assert untied.n_params() == 131392 + 32768
    assert untied.flops_per_token(128) == 788352 + 196608  # same matmuls, one more stored matrix
