"""model/ stays importable by every stage, the DeepSpeed trainer and the server: torch + safetensors + stdlib only."""

import subprocess
import sys
from pathlib import Path

FORBIDDEN = [
    "prefect",
    "mlflow",
    "dvc",
    "deepspeed",
    "yaml",
    "transformers",
    "tokenizers",
    "datasets",
    "tasks",
    "flows",
]


def test_model_package_imports_no_orchestration_stack():
    code = (
        "import sys, model, model.config, model.llama, model.generate, model.hf, model.card, model.heads, "
        "model.losses; "
        "print('\\n'.join(sorted(sys.modules)))"
    )
    repo = Path(__file__).resolve().parents[1]
    loaded = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    top_level = {name.split(".")[0] for name in loaded.stdout.split()}
    assert "model" in top_level and "torch" in top_level
    leaked = sorted(set(FORBIDDEN) & top_level)
    assert not leaked, f"importing model/ pulled in {leaked}"
