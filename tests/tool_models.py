"""Test-only checkpoints for tool calls: a preset whose chat template has no tool section (plain
ChatML, as many real instruct models ship: SmolLM2's is one), so its tool-call format cannot
be known from the template."""
import json
import shutil
from pathlib import Path

from kvray.replica.models.presets import ensure_preset

# ChatML without tools: a template renders them nowhere, and writes no call format
PLAIN_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def no_tool_template_checkpoint(out_dir: Path, preset: str = "tiny-qwen3") -> Path:
    """A copy of ``preset``'s checkpoint in ``out_dir`` whose chat template is ``PLAIN_CHATML``."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        shutil.copytree(ensure_preset(preset), out_dir, dirs_exist_ok=True)
        path = out_dir / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        cfg["chat_template"] = PLAIN_CHATML
        path.write_text(json.dumps(cfg, indent=2))
    return out_dir
