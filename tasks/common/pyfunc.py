"""The registered model's Python function: text from a prompt, or the assistant's reply to a chat.

MLflow logs this file as a "model from code" (`tasks/register.py`), with the HF model folder as the artifact
`model` and `model/` + `tasks/common/chat.py` as code, so a registered version runs anywhere MLflow does:

    MLFLOW_TRACKING_URI=sqlite:///mlruns.db mlflow models serve -m models:/scratchlm@champion \
        --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{
      "dataframe_records": [{"messages": [{"role": "user", "content": "Tell me a story about a cat."}]},
                            {"prompt": "Once upon a time", "messages": []}],
      "params": {"max_new_tokens": 64, "temperature": 0.8, "seed": 0}}'
    -> {"predictions": [{"text": "..."}, {"text": "..."}]}

    mlflow.pyfunc.load_model("models:/scratchlm@champion").predict(
        pd.DataFrame([{"prompt": "Once upon a time"}]), params={"max_new_tokens": 32})

A row with `messages` ({role, content} turns) gets the assistant's next reply, rendered with the chat format of
tasks/common/chat.py and stopped at `<|end|>`; a row with only `prompt` gets a plain continuation of that text,
stopped at `<|endoftext|>`. Generation is model.generate (KV cache, temperature / top-p sampling, seeded).
A request without rows, a row with neither, malformed messages or an input longer than the context is refused
with an MlflowException (INVALID_PARAMETER_VALUE) naming the row: MLflow's scoring server answers HTTP 400 with
that message, never a 200 with fewer predictions than rows. (MLflow drops columns the signature does not name,
and with them a row that has no other: `{"dataframe_records": [{"foo": "bar"}]}` reaches predict with no rows.)
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
        rows = _rows(model_input)
        if not rows:  # MLflow drops the columns the signature does not name, and a row that had only those
            raise bad_request(f"the request has no input row with `messages` or `prompt`; each row {ROW_NEEDS}")
        return [{"text": self.generate_row(row, settings, i)} for i, row in enumerate(rows)]

    def generate_row(self, row: dict[str, Any], settings: dict[str, Any], index: int = 0) -> str:
        """The text for one input row (`index`: its position in the request, for error messages)."""
        from model.generate import generate

        ids, stops = self.row_ids(row, index)
        budget = self.budget(ids, index)
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

    def budget(self, ids: list[int], index: int = 0) -> int:
        """How many new tokens fit in the context after `ids`; a bad request naming the row when none does."""
        budget = self.model.cfg.max_seq_len - len(ids)
        if budget < 1:
            raise bad_request(
                f"input row {index}: the input is {len(ids)} tokens; the model's context is "
                f"{self.model.cfg.max_seq_len}"
            )
        return budget

    def row_ids(self, row: dict[str, Any], index: int) -> tuple[list[int], list[int]]:
        """(prompt ids, stop ids) of one input row: a chat's generation prompt, or a plain text's start."""
        messages, prompt = row.get("messages"), row.get("prompt")
        if _present(messages):
            try:
                plain = _plain_messages(messages)
                ids, _ = self.chat.encode_chat(self.tokenizer, plain, add_generation_prompt=True)
            except (ValueError, TypeError, KeyError) as e:
                raise bad_request(f"input row {index}: {e}") from None
            return ids, self.chat_stops
        if _present(prompt):
            # a document starts after an end-of-text token, as in pretraining
            return [self.text_stops[0]] + self.chat.encode_plain(self.tokenizer, str(prompt)), self.text_stops
        raise bad_request(f"input row {index}: {ROW_NEEDS}")


ROW_NEEDS = (
    "needs `messages` (a list of {role, content} turns, role system|user|assistant) or `prompt` (a string), "
    'e.g. {"dataframe_records": [{"messages": [{"role": "user", "content": "Hi!"}]}, '
    '{"prompt": "Once upon a time", "messages": []}], "params": {"max_new_tokens": 64}} (README.md, "Serving")'
)
"""What a request row must hold (the error a row without either gets)."""


def bad_request(message: str) -> Exception:
    """An MlflowException MLflow's scoring server answers with HTTP 400 and `message`."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """DataFrame / list of dicts / one dict / a bare string → list of row dicts (one per row, even a row whose
    every column MLflow dropped as unknown: pandas would give no record for it)."""
    if hasattr(model_input, "to_dict"):
        if len(model_input.columns) == 0:
            return [{} for _ in range(len(model_input))]
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
    """Input: optional `prompt` (string) and `messages` (array of {role, content}); output `text`; params PARAMS.

    Both columns are optional because a row needs one or the other, which a schema cannot say: `predict` refuses
    a row with neither (HTTP 400 when served), and MLflow refuses a `messages` that is not an array of
    {role, content}."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    turn = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(turn), "messages", required=False)])
    outputs = Schema([ColSpec("string", "text")])
    kinds = {int: "long", float: "double"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


mlflow.models.set_model(ScratchLMModel())
