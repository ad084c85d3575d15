"""HF checkpoint format: transformers' LlamaForCausalLM loads our export and computes the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hf import export_hf, import_hf, load, load_config, save
from model.llama import Llama

transformers = pytest.importorskip("transformers")

CASES = [(4, True), (4, False), (2, True), (2, False), (1, True), (1, False)]  # MHA, GQA, MQA x tied/untied


def make(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.from_preset("tiny", **overrides)).eval()


@pytest.mark.parametrize("n_kv_heads,tied", CASES)
def test_transformers_logits_match(tmp_path, n_kv_heads, tied):
    model = make(n_kv_heads=n_kv_heads, tie_embeddings=tied, rope_theta=500000.0)
    export_hf(model, None, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tied
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, all_logits=True)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_transformers_left_padded_batch_matches(tmp_path):
    model = make()
    export_hf(model, None, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, _ = model(idx, attention_mask=mask, all_logits=True)
        theirs = hf(idx, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_import_of_export_is_identical(tmp_path, tied):
    model = make(n_kv_heads=2, tie_embeddings=tied, dropout=0.1)
    save(model, tmp_path)
    back = load(tmp_path)
    assert back.cfg == model.cfg and not back.training
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (back.lm_head.weight is back.tok_emb.weight) == tied
    assert torch.equal(back.rope_cos, model.rope_cos)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.k_proj.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) != tied


def test_config_json_and_bf16_export(tmp_path):
    model = make()
    export_hf(model, model.cfg, tmp_path, dtype=torch.bfloat16, eos_token_id=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["rope_parameters"]["rope_type"] == "default"
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == 3 and cfg["bos_token_id"] is None
    assert cfg["scratchlm"] == model.cfg.to_dict()
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 3}
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "model.safetensors")).values())
    back = load(tmp_path)  # float32 by default
    assert back.tok_emb.weight.dtype == torch.float32
    assert torch.equal(back.tok_emb.weight, model.tok_emb.weight.to(torch.bfloat16).float())


def test_tokenizer_files_copied_and_special_ids_found(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(
        json.dumps(
            {
                "model": {"vocab": {"a": 5, "b": 6}},
                "added_tokens": [{"id": 0, "content": "<|endoftext|>"}, {"id": 1, "content": "<|pad|>"}],
            }
        )
    )
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|pad|>"})
    )
    (tok / "README.md").write_text("the card of another model")  # e.g. tokenizer_dir is an upstream model folder
    out = tmp_path / "model"
    save(make(), out, tokenizer_dir=tok)
    assert (out / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()
    assert not (out / "README.md").exists()  # a card describes its own folder: never copied
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 0, 1)


def test_plain_hf_folder_imports_and_bad_folders_are_refused(tmp_path):
    model = make(n_kv_heads=1, tie_embeddings=False)
    export_hf(model, None, tmp_path)
    cfg_file = tmp_path / "config.json"
    hf_cfg = json.loads(cfg_file.read_text())
    del hf_cfg["scratchlm"]  # as written by another tool
    cfg_file.write_text(json.dumps(hf_cfg))
    assert load_config(tmp_path) == model.cfg
    assert torch.equal(import_hf(tmp_path).blocks[1].attn.wk.weight, model.blocks[1].attn.wk.weight)

    cfg_file.write_text(json.dumps({**hf_cfg, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        load_config(tmp_path)
    cfg_file.write_text(json.dumps({**hf_cfg, "scratchlm": {**model.cfg.to_dict(), "n_layers": 3}}))
    with pytest.raises(ValueError, match="disagrees with the HF keys"):
        load_config(tmp_path)
    cfg_file.write_text(json.dumps(hf_cfg))
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="q_proj.bias"):
        import_hf(tmp_path)
    del weights["model.layers.0.self_attn.q_proj.bias"], weights["model.norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing \['norm.weight'\]"):
        import_hf(tmp_path)


# ---- stop tokens and the model card ---------------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there, my friend."}]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A tokenizer folder as the tokenizer stage writes one: the chat special tokens and template."""
    from tests.evaluate_fixtures import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def trained_to_answer(tokenizer_dir, steps: int = 150) -> Llama:
    """A tiny Llama trained on CONVERSATION repeated: it answers "Hi!" with the reply, `<|end|>`, then goes on to
    the next turn (`<|user|>` ...) unless generation stops."""
    from tokenizers import Tokenizer

    from tasks.common.chat import encode_chat

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    data = torch.tensor(encode_chat(tok, CONVERSATION)[0] * 40)
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_preset("tiny", vocab_size=tok.get_vocab_size()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 49, (8,), generator=g)
        x = torch.stack([data[s : s + 48] for s in starts])
        y = torch.stack([data[s + 1 : s + 49] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_stop_tokens_are_every_eos_in_both_configs(tmp_path, chat_tokenizer):
    from tasks.common.chat import END, EOT, STOP_TOKENS

    vocab = json.loads((chat_tokenizer / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    save(make(vocab_size=512), tmp_path, tokenizer_dir=chat_tokenizer, stop_tokens=STOP_TOKENS)
    stops = [ids[END], ids[EOT]]
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == stops
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": stops, "pad_token_id": 1}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert list(hf.generation_config.eos_token_id) == stops
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token == EOT  # the tokenizer's eos is unchanged
    with pytest.raises(ValueError, match=r"tokenizer.json: no stop token <\|stop\|>"):
        save(make(vocab_size=512), tmp_path / "bad", tokenizer_dir=chat_tokenizer, stop_tokens=["<|stop|>"])


def test_transformers_generate_stops_at_the_end_of_turn(tmp_path, chat_tokenizer):
    from tasks.common.chat import END, STOP_TOKENS

    folder = save(
        trained_to_answer(chat_tokenizer), tmp_path / "model", tokenizer_dir=chat_tokenizer, stop_tokens=STOP_TOKENS
    )
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    inputs = tok.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=40, do_sample=False)[0, prompt_len:].tolist()
    end = tok.convert_tokens_to_ids(END)
    assert out[-1] == end and out.count(end) == 1 and len(out) < 40  # stopped at <|end|>, before the budget
    assert tok.decode(out, skip_special_tokens=True) == CONVERSATION[1]["content"]
    with torch.no_grad():  # the control: with the tokenizer's eos only, the same model runs past the reply
        more = hf.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id)[0, prompt_len:]
    assert more.tolist()[: len(out)] == out and len(more) > len(out)


def test_model_card_describes_the_folder(tmp_path, chat_tokenizer):
    from model.card import write_card
    from tasks.common.chat import CHAT_TEMPLATE, STOP_TOKENS

    folder = save(make(vocab_size=512), tmp_path, tokenizer_dir=chat_tokenizer, stop_tokens=STOP_TOKENS)
    card = write_card(
        folder,
        stage="sft",
        training="supervised fine-tuning on chat conversations",
        base="the pretrain stage's model (data/pretrain/model)",
        params={"sft": {"builtin_train": 64}, "train": {"lr": 0.0003, "max_steps": 4}, "tags": ["ignored"]},
        metrics={"val_loss": 2.345678, "sft_per_constraint": {"name": 0.5}, "steps": 4},
    ).read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert f"{make(vocab_size=512).num_params():,} parameters" in card
    assert "stage: `sft`, supervised fine-tuning" in card and "base: the pretrain stage's model" in card
    assert "| `train.lr` | 0.0003 |" in card and "| `sft.builtin_train` | 64 |" in card and "`tags`" not in card
    assert "| `val_loss` | 2.346 |" in card and "| `sft_per_constraint.name` | 0.5 |" in card
    assert "Stop tokens: `<|end|>` (id 5), `<|endoftext|>` (id 0)." in card
    assert CHAT_TEMPLATE in card and "AutoModelForCausalLM.from_pretrained" in card and "apply_chat_template" in card
    assert "from model.hf import load" in card and "scratchlm chat --model" in card
