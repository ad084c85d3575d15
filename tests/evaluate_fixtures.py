"""Small real artefacts for the evaluate/register/promote/serve/chat tests: a tokenizer trained here by the
tokenizer stage's own code (byte-level BPE, the chat special tokens and template) and tiny Llamas exported as HF
folders (model.hf.save), randomly initialised or trained for a few steps. They keep those tests fast and
independent of a full pipeline run."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from model.config import ModelConfig
from model.heads import RewardModel
from model.hf import load, save
from model.llama import Llama
from tasks import register
from tasks.common.dvcio import stage_paths, write_jsonl_gz
from tasks.common.tracking import stage_run
from tasks.pretokenize import encode_docs, load_plain
from tasks.tokenizer import TokenizerConfig, save_folder, train_bpe

NAMES = ["Mia", "Tom", "Lily", "Ben", "Sara", "Max"]
PLACES = ["park", "garden", "river", "school", "forest", "market"]
THINGS = ["ball", "kite", "book", "cat", "apple", "boat"]


def story_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, place, thing = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
        out.append(f"{name} went to the {place}. {name} found a {thing} and smiled. The {thing} was red.")
    return out


def train_tokenizer(folder: Path, vocab_size: int = 512) -> Path:
    """An HF tokenizer folder exactly as the tokenizer stage writes one (tokenizer.json + configs + template)."""
    texts = story_sentences(400, 0)
    tok = train_bpe(iter([texts]), TokenizerConfig(vocab_size=vocab_size, min_frequency=1), len(texts))
    folder.mkdir(parents=True, exist_ok=True)
    save_folder(tok, folder)
    return folder


def _vocab_size(tokenizer_dir: Path) -> int:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


def tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, max_seq_len: int = 512, **overrides) -> Path:
    """A randomly initialised tiny Llama saved as an HF folder with the tokenizer files beside it."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=_vocab_size(tokenizer_dir), max_seq_len=max_seq_len, **overrides)
    save(Llama(cfg).eval(), folder, tokenizer_dir=tokenizer_dir)
    return folder


def train_tiny(
    folder: Path, tokenizer_dir: Path, texts: list[str], steps: int = 60, seed: int = 0, max_seq_len: int = 512
) -> Path:
    """A tiny Llama trained for a few AdamW steps on `texts` (documents joined by <|endoftext|>)."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text, add_special_tokens=False).ids + [eot]
    data = torch.tensor(ids)
    torch.manual_seed(seed)
    model = Llama(ModelConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=max_seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        x = torch.stack([data[s : s + 64] for s in starts])  # (16,64)
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save(model.eval(), folder, tokenizer_dir=tokenizer_dir)
    return folder


VAL_TEXTS = [
    "Mia went to the park. She found a red ball and smiled.",
    "Le café était fermé, so Tom walked to the river — naïve and happy. 🙂",
    "Ben read a book in the garden. The book was about a boat.",
]


def write_pretokenize(root: Path, tokenizer_dir: Path, texts: list[str]) -> Path:
    """data/pretokenize/{val.bin, meta.json, val_docs.jsonl.gz} in the pretokenize stage's format (its encoder)."""
    out = root / "data" / "pretokenize"
    out.mkdir(parents=True, exist_ok=True)
    tok = load_plain(tokenizer_dir / "tokenizer.json")
    eot = tok.token_to_id("<|endoftext|>")
    tokens = encode_docs(tok, texts, eot, "uint16")
    tokens.tofile(out / "val.bin")
    write_jsonl_gz(
        out / "val_docs.jsonl.gz", [{"id": f"v{i}", "text": t, "source": "test"} for i, t in enumerate(texts)]
    )
    meta = {
        "dtype": "uint16",
        "byteorder": "little",
        "eot_id": eot,
        "pad_id": tok.token_to_id("<|pad|>"),
        "vocab_size": tok.get_vocab_size(),
        "val_docs": "val_docs.jsonl.gz",
        "splits": {
            "val": {
                "documents": len(texts),
                "tokens": int(len(tokens)),
                "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
            }
        },
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def pipeline_outputs(root: Path, stages: tuple[str, ...] = ("pretrain", "sft", "dpo"), reward: bool = True) -> Path:
    """What the stages upstream of evaluate leave under <root>/data: tokenizer, pretokenize, models, reward model."""
    tok_dir = train_tokenizer(root / "data" / "tokenizer")
    write_pretokenize(root, tok_dir, VAL_TEXTS + story_sentences(20, 7))
    for i, stage in enumerate(stages):  # random weights, a different seed per stage: evaluation needs no skill
        tiny_model(root / "data" / stage / "model", tok_dir, seed=i)
    if reward:
        torch.manual_seed(3)
        backbone = load(root / "data" / stages[-1] / "model")
        RewardModel.from_backbone(backbone).save(root / "data" / "reward" / "model", tokenizer_dir=tok_dir)
    return root


FLUENT = {
    "fluency_nll": 0.9,
    "fluency_gap": 0.2,
    "repeated_line_rate": 0.0,
    "repeated_ngram_rate": 0.01,
    "distinct_1": 0.26,
    "distinct_2": 0.73,
    "mean_words": 98.0,
    "nonword_rate": 0.004,
}
"""Degeneration figures of a model writing ordinary stories (what the promotion gates let through)."""


def evaluation(dpo_bpb: float = 1.5, satisfaction: float = 0.25, cloze: float = 0.5) -> dict:
    """A metrics/all/evaluate.json as the evaluate stage writes it (the register stage reads the DPO model's part)."""

    def model(bpb: float, sat: float, acc: float) -> dict:
        return {
            "val_loss": bpb * 2.4,
            "val_ppl": 10.0,
            "val_bpb": bpb,
            "val_tokens": 1000,
            "val_docs": 10,
            "satisfaction": sat,
            "all_satisfied": sat / 2,
            "per_constraint": {"name": 0.9},
            **FLUENT,
            "bench": {"cloze": {"acc": acc, "acc_norm": acc - 0.05}, "piqa": {"acc": 0.55, "acc_norm": 0.5}},
        }

    return {
        "models": ["base", "sft", "dpo"],
        "model_stages": {"base": "pretrain", "sft": "sft", "dpo": "dpo"},
        "base": model(dpo_bpb + 0.1, 0.0, cloze - 0.1),
        "sft": model(dpo_bpb + 0.05, satisfaction / 2, cloze),
        "dpo": model(dpo_bpb, satisfaction, cloze),
        "win_rate": {"sft_vs_base": 0.7, "dpo_vs_sft": 0.6},
        "skipped": {},
    }


PARAMS = """\
register: {}
promote:
  max_val_bpb: 3.0
  min_satisfaction: 0.1
  max_benchmark_drop: 0.05
  min_win_rate: null
"""


def registry_project(root: Path, monkeypatch, metrics: dict | None = None) -> Path:
    """A project folder ready for the register stage: data/dpo/model, metrics/all/evaluate.json, dvc.lock, params;
    MLflow pointed at a SQLite file inside it (artifacts under it too: the working directory moves there)."""
    tok_dir = train_tokenizer(root / "data" / "tokenizer")
    tiny_model(root / "data" / "dpo" / "model", tok_dir, seed=5)
    (root / "metrics" / "all").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "all" / "evaluate.json").write_text(json.dumps(metrics or evaluation()))
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  dpo:\n    cmd: python -m tasks.dpo\n    outs:\n    - path: data/dpo\n"
        "      md5: 1111.dir\n  evaluate:\n    cmd: python -m tasks.evaluate\n    deps:\n    - path: data/dpo\n"
        "      md5: 1111.dir\n    outs:\n    - path: data/evaluate\n      md5: 2222.dir\n"
    )
    (root / "params.yaml").write_text(PARAMS)
    monkeypatch.setenv("SCRATCHLM_PARAMS", str(root / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns.db'}")
    monkeypatch.delenv("SCRATCHLM_NO_MLFLOW", raising=False)
    monkeypatch.chdir(root)
    return root


@contextlib.contextmanager
def registered(tmp_path_factory, name: str) -> Iterator[tuple[Path, dict]]:
    """A project with one good version registered by the register stage (@challenger on it), MLflow pointed at its
    SQLite store for the duration: (root, registered.json)."""
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        registry_project(root, mp)
        yield root, run_register(root)


def run_register(root: Path) -> dict:
    """The register stage's run() inside its own MLflow run, as stage_main does it; returns registered.json."""
    with stage_run("register", {}) as tracker:
        # the fixture world registers its dpo model (the default, ppo, is not among its stages)
        register.run(register.RegisterConfig(model_stage="dpo"), stage_paths("register", root=root), tracker)
    return json.loads((root / "data" / "register" / "registered.json").read_text())
