"""Instruction and preference data for the alignment stages, from the builtin world or real files.

Normalised forms (what SFT, reward and DPO consume):
    instruction  {"id", "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "constraints"?}
                 the last message is the assistant's answer; every assistant turn is trained on
    preference   {"id", "prompt_messages": [...], "chosen": str, "rejected": str, "constraints"?}
                 the prompt is a conversation ending with a user turn; chosen/rejected are assistant replies
    prompt       {"id", "prompt_messages": [...], "constraints"?, "answer"?}   (what the ppo stage answers)
                 a verifiable reward needs one of the two: builtin constraints, or a final answer (GSM8K)

Sources (a list in the stage's params):
    builtin:instructions / builtin:preferences / builtin:prompts   the seeded world of tasks/sources/builtin.py
                 (checkable constraints; builtin:prompts are the instructions without their answers)
    a .json (array) / .jsonl / .jsonl.gz file    rows in any of these formats, detected per row:
        chat         {"messages": [...]}
        Alpaca       {"instruction", "input"?, "output"}
        Self-Instruct {"instruction", "instances": [{"input", "output"}, ...]}   (one example per instance)
        GSM8K        {"question", "answer"}
        preference   {"prompt", "chosen", "rejected"}   (prompt a string or a messages list)
        prompt       {"prompt", "answer"?}, or a chat {"messages"} ending with a user turn   (ppo)
        HH-RLHF      {"chosen", "rejected"} full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts, split at the
                     last assistant turn (the two must share everything before it)
A row that fits no format, or breaks the contract, is a quarantined `Record` with its file and line, never a crash.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.common.config import ScratchError, input_path
from tasks.sources.files import Record, jsonl_lines, relative_location

ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


# ------------------------------------------------------------------------------------------------ rows from files


def read_rows(path: Path) -> Iterator[tuple[str, Any | None, str | None]]:
    """(location, parsed row or None, reason if unparseable) for every row of a .json array or JSON Lines file."""
    name = path.name.lower()
    if name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ScratchError(f"{path}: not a valid JSON file: {e}") from None
        if not isinstance(rows, list):
            raise ScratchError(f"{path}: expected a JSON array of examples, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{path}@{i}", row, None
        return
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise ScratchError(f"{path}: unsupported file type (use .json, .jsonl or .jsonl.gz)")
    for item in jsonl_lines(path):
        if isinstance(item, Record):  # a binary file, or the unreadable rest of a corrupt / truncated one
            yield item.location, None, item.reason
            continue
        location, raw = item
        try:
            yield location, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield location, None, f"invalid UTF-8 at byte {e.start}"
        except json.JSONDecodeError as e:
            yield location, None, f"malformed JSON: {e.msg} at column {e.colno}"


def resolve(spec: str, root: Path) -> Path:
    path = input_path(spec, root)
    if not path.is_file():
        raise ScratchError(f"{spec!r}: no such file ({path})")
    return path


# ------------------------------------------------------------------------------------------------ instructions


def to_instruction(row: Any) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a row in any supported instruction format, or (None, reason)."""
    if not isinstance(row, dict):
        return None, f"not a JSON object ({type(row).__name__})"
    if "messages" in row:
        return check_messages(row["messages"], final_role="assistant")
    if "instruction" in row and "output" in row:
        prompt = _join(row.get("instruction"), row.get("input", ""))
        return _pair(prompt, row.get("output"))
    if "question" in row and "answer" in row:
        return _pair(row.get("question"), row.get("answer"))
    return None, "no known instruction format (messages | instruction/input/output | question/answer)"


def instruction_examples(row: Any) -> list[tuple[list[dict] | None, str | None]]:
    """Self-Instruct rows hold several instances: one example each; every other format is one example."""
    if isinstance(row, dict) and "instruction" in row and isinstance(row.get("instances"), list):
        return [
            _pair(_join(row.get("instruction"), inst.get("input", "")), inst.get("output"))
            if isinstance(inst, dict)
            else (None, "instance is not an object")
            for inst in row["instances"]
        ]
    return [to_instruction(row)]


def _join(instruction: Any, extra: Any) -> Any:
    if not isinstance(instruction, str) or not isinstance(extra, str):
        return instruction if not isinstance(instruction, str) else None
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _pair(prompt: Any, answer: Any) -> tuple[list[dict] | None, str | None]:
    return check_messages(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], final_role="assistant"
    )


def check_messages(messages: Any, final_role: str) -> tuple[list[dict] | None, str | None]:
    """Validate a conversation: known roles, non-empty string contents, a user turn, ending with `final_role`."""
    if not isinstance(messages, list) or not messages:
        return None, "messages must be a non-empty list"
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return None, f"message {i}: role must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return None, f"message {i} ({m['role']}): content must be a non-empty string"
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in clean):
        return None, "no user message"
    if clean[-1]["role"] != final_role:
        return None, f"the last message must be from the {final_role}"
    return clean, None


def load_instructions(
    sources: list[str], root: Path, builtin_n: int, seed: int, split: str = "train"
) -> Iterator[tuple[dict | None, Record | None]]:
    """(example, None) or (None, quarantined Record) for every row of every source, in order."""

    def builtin_examples() -> Iterator[dict]:
        from tasks.sources import builtin

        return builtin.generate_instructions(builtin_n, seed, split)

    def file_examples(path: Path) -> Iterator[tuple[dict | None, Record | None]]:
        for location, row, reason in read_rows(path):
            examples = [(None, reason)] if reason else instruction_examples(row)
            for k, (messages, why) in enumerate(examples):
                rid = relative_location(location if len(examples) == 1 else f"{location}/{k}", root)
                yield ({"id": rid, "messages": messages}, None) if messages else (None, Record(rid, reason=why))

    return _load_sources(sources, root, "instruction", builtin_examples, file_examples)


def _load_sources(
    sources: list[str],
    root: Path,
    kind: str,
    builtin_examples: Callable[[], Iterable[dict]],
    file_examples: Callable[[Path], Iterator[tuple[dict | None, Record | None]]],
) -> Iterator[tuple[dict | None, Record | None]]:
    """Every source in order: `builtin:<kind>s` through builtin_examples(), a file through file_examples(path)."""
    for spec in sources:
        if spec == f"builtin:{kind}s":
            for ex in builtin_examples():
                yield ex, None
            continue
        if spec.startswith("builtin:"):
            raise ScratchError(f"{spec!r}: unknown builtin {kind} source (known: builtin:{kind}s)")
        yield from file_examples(resolve(spec, root))


# ------------------------------------------------------------------------------------------------ preferences


def to_preference(row: Any) -> tuple[dict | None, str | None]:
    """{prompt_messages, chosen, rejected} from a prompt/chosen/rejected row or an HH-RLHF transcript pair."""
    if not isinstance(row, dict):
        return None, f"not a JSON object ({type(row).__name__})"
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, "chosen and rejected must both be strings"
    if "prompt" in row:
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages, why = check_messages(messages, final_role="user")
        if why:
            return None, f"prompt: {why}"
    else:
        messages, chosen, rejected, why = split_hh(chosen, rejected)
        if why:
            return None, why
    if not chosen.strip() or not rejected.strip():
        return None, "empty chosen or rejected reply"
    if chosen == rejected:
        return None, "chosen and rejected are identical"
    return {"prompt_messages": messages, "chosen": chosen, "rejected": rejected}, None


def parse_hh(transcript: str) -> list[dict]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" → [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = HH_TURN.split(transcript)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def split_hh(chosen: str, rejected: str) -> tuple[list[dict] | None, str, str, str | None]:
    """Split two HH-RLHF transcripts at their last assistant turn; they must share everything before it."""
    c_turns, r_turns = parse_hh(chosen), parse_hh(rejected)
    if not c_turns or not r_turns or c_turns[-1]["role"] != "assistant" or r_turns[-1]["role"] != "assistant":
        return None, "", "", "not an HH-RLHF transcript ending in an Assistant turn"
    if c_turns[:-1] != r_turns[:-1]:
        return None, "", "", "chosen and rejected differ before the last assistant turn"
    messages, why = check_messages(c_turns[:-1], final_role="user")
    if why:
        return None, "", "", f"prompt: {why}"
    return messages, c_turns[-1]["content"], r_turns[-1]["content"], None


def load_preferences(
    sources: list[str], root: Path, builtin_n: int, seed: int, split: str = "train"
) -> Iterator[tuple[dict | None, Record | None]]:
    """(pair, None) or (None, quarantined Record) for every row of every source, in order."""

    def builtin_pairs() -> Iterator[dict]:
        from tasks.sources import builtin

        for p in builtin.generate_preferences(builtin_n, seed, split):
            yield {
                "id": p["id"],
                "prompt_messages": [{"role": "user", "content": p["prompt"]}],
                "chosen": p["chosen"],
                "rejected": p["rejected"],
                "constraints": p["constraints"],
            }

    def file_pairs(path: Path) -> Iterator[tuple[dict | None, Record | None]]:
        for location, row, reason in read_rows(path):
            pair, why = (None, reason) if reason else to_preference(row)
            rid = relative_location(location, root)
            yield ({"id": rid, **pair}, None) if pair else (None, Record(rid, reason=why))

    return _load_sources(sources, root, "preference", builtin_pairs, file_pairs)


# ------------------------------------------------------------------------------------------------ prompts (ppo)

GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'1,234.50' → '1234.5', '$72' → '72'; None when `text` holds no number."""
    found = NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value


def final_answer(text: str) -> str | None:
    """The final number of an answer: after GSM8K's `####` when present, else the last number in the text."""
    marked = GSM8K_ANSWER.search(text.strip())
    return normalise_number(marked.group(1) if marked else text)


def to_prompt(row: Any) -> tuple[dict | None, str | None]:
    """{prompt_messages, answer?} from a GSM8K {question, answer}, a {prompt, answer?} or a {messages} row."""
    if not isinstance(row, dict):
        return None, f"not a JSON object ({type(row).__name__})"
    if "question" in row or "prompt" in row:
        text = row.get("question", row.get("prompt"))
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    elif "messages" in row:
        messages = row["messages"]
    else:
        return None, "no known prompt format (question/answer | prompt/answer | messages)"
    messages, why = check_messages(messages, final_role="user")
    if why:
        return None, f"prompt: {why}"
    out: dict = {"prompt_messages": messages}
    if "answer" in row:
        if not isinstance(row["answer"], str) or final_answer(row["answer"]) is None:
            return None, "answer: holds no final number (GSM8K ends it with '#### <number>')"
        out["answer"] = final_answer(row["answer"])
    return out, None


def load_prompts(
    sources: list[str], root: Path, builtin_n: int, seed: int, split: str = "train"
) -> Iterator[tuple[dict | None, Record | None]]:
    """(prompt, None) or (None, quarantined Record) for every row of every source, in order."""

    def builtin_prompts() -> Iterator[dict]:
        from tasks.sources import builtin

        for ex in builtin.generate_instructions(builtin_n, seed, split):
            yield {"id": ex["id"], "prompt_messages": ex["messages"][:-1], "constraints": ex["constraints"]}

    def file_prompts(path: Path) -> Iterator[tuple[dict | None, Record | None]]:
        for location, row, reason in read_rows(path):
            prompt, why = (None, reason) if reason else to_prompt(row)
            rid = relative_location(location, root)
            yield ({"id": rid, **prompt}, None) if prompt else (None, Record(rid, reason=why))

    return _load_sources(sources, root, "prompt", builtin_prompts, file_prompts)
