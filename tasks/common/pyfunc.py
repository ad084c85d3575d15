"""The registered model's Python function: text from a prompt, or the assistant's reply to a chat.

MLflow logs this file as a "model from code" (`tasks/register.py`), with the HF model folder as the artifact
`model` and `model/` + `tasks/common/chat.py` as code, so a registered version runs anywhere MLflow does:

    mlflow models serve -m models:/scratchlm@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{
      "dataframe_records": [{"messages": [{"role": "user", "content": "Tell me a story about a cat."}]},
                            {"prompt": "Once upon a time"}],
      "params": {"max_new_tokens": 64, "temperature": 0.8, "seed": 0}}'
    -> {"predictions": [{"text": "..."}, {"text": "..."}]}

    mlflow.pyfunc.load_model("models:/scratchlm@champion").predict(
        pd.DataFrame([{"prompt": "Once upon a time"}]), params={"max_new_tokens": 32})

A row with `messages` ({role, content} turns) gets the assistant's next reply, rendered with the chat format of
tasks/common/chat.py and stopped at `<|end|>`; a row with only `prompt` gets a plain continuation of that text,
stopped at `<|endoftext|>`. Generation is model.generate (KV cache, temperature / top-p sampling, seeded).
This module imports no scratchlm stage code: only `model` (torch), `chat` and MLflow, tokenizers, pandas.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

# the signature (tasks/register.py) validates inputs; MLflow's nudge towards type hints on predict is noise here
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method.*")

ARTIFACT = "model"
"""Name of the HF model folder among the logged model's artifacts."""

PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "seed": 0}
"""Inference params a request may set (the signature's ParamSchema), with their defaults."""


def _chat_module():
    """tasks.common.chat in the repository; `chat` (a top-level copy) inside a logged model's code folder."""
    try:
        from tasks.common import chat
    except ImportError:
        import chat  # type: ignore[no-redef]
    return chat


class ScratchLMModel(mlflow.pyfunc.PythonModel):
    """Generates with our Llama (model.hf.load) and the folder's `tokenizers` tokenizer."""

    def load_context(self, context: Any) -> None:
        self.load_folder(context.artifacts[ARTIFACT])

    def load_folder(self, folder: str | Path) -> ScratchLMModel:
        from tokenizers import Tokenizer

        from model.hf import load

        self.chat = _chat_module()
        self.folder = Path(folder)
        self.model = load(self.folder)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        ids = self.chat.special_ids(self.tokenizer)
        self.chat_stops = [ids[t] for t in self.chat.STOP_TOKENS]
        self.text_stops = [ids[self.chat.EOT]]
        return self

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """One {"text"} per input row (see the module docstring)."""
        settings = {**PARAMS, **(params or {})}
        return [{"text": self.generate_row(row, settings)} for row in _rows(model_input)]

    def generate_row(self, row: dict[str, Any], settings: dict[str, Any]) -> str:
        from model.generate import generate

        messages, prompt = row.get("messages"), row.get("prompt")
        if _present(messages):
            ids, _ = self.chat.encode_chat(self.tokenizer, _plain_messages(messages), add_generation_prompt=True)
            stops = self.chat_stops
        elif _present(prompt):
            # a document starts after an end-of-text token, as in pretraining
            ids = [self.text_stops[0]] + self.chat.encode_plain(self.tokenizer, str(prompt))
            stops = self.text_stops
        else:
            raise ValueError("each input row needs `messages` (a list of {role, content}) or `prompt` (a string)")
        budget = self.model.cfg.max_seq_len - len(ids)
        if budget < 1:
            raise ValueError(f"the input is {len(ids)} tokens; the model's context is {self.model.cfg.max_seq_len}")
        new = generate(
            self.model,
            [ids],
            max_new_tokens=min(int(settings["max_new_tokens"]), budget),
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            stop_tokens=stops,
            seed=int(settings["seed"]),
        )[0]
        return self.tokenizer.decode(new, skip_special_tokens=False)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """DataFrame / list of dicts / one dict / a bare string → list of row dicts."""
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):  # a missing cell in a DataFrame
        return False
    return not (hasattr(value, "__len__") and len(value) == 0)


def _plain_messages(messages: Any) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(messages)]


def signature():
    """Input: optional `prompt` (string) and `messages` (array of {role, content}); output `text`; params PARAMS."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    turn = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(turn), "messages", required=False)])
    outputs = Schema([ColSpec("string", "text")])
    kinds = {int: "long", float: "double"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


mlflow.models.set_model(ScratchLMModel())
