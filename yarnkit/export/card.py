"""Write README.md, the model card of an export: base model, recipe, YaRN parameters, training data, the run's
evaluation results (every `RUN/eval/*.json`, read generically, and its PNG plots, copied into `eval/`), the
verification numbers, and how to load the folder with transformers, vLLM and llama.cpp.

Pure formatting over the export report; tested in tests/test_export.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from yarnkit.export.rope_keys import main_rope_dict


def _rows(data) -> list[dict]:
    """The list of flat records inside an eval JSON: the top-level list, or the first list of dicts found."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                return value
        return [{k: v for k, v in data.items() if not isinstance(v, (dict, list))}]
    return []


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def eval_section(run_dir: Path | None, out: Path) -> str:
    folder = run_dir / "eval" if run_dir else None
    if folder is None or not folder.is_dir():
        return "No evaluation results were found in the run (`RUN/eval/*.json`).\n"
    parts = []
    for path in sorted(folder.glob("*.json")):
        try:
            rows = _rows(json.loads(path.read_text()))
        except json.JSONDecodeError:
            parts.append(f"`{path.name}`: not valid JSON, skipped.\n")
            continue
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
        if not rows:
            continue
        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
        parts.append(f"**{path.stem}** (`eval/{path.name}`)\n\n" + "\n".join(table) + "\n")
    plots = sorted(folder.glob("*.png"))
    if plots or parts:
        (out / "eval").mkdir(exist_ok=True)
        for path in [*folder.glob("*.json"), *plots]:
            shutil.copyfile(path, out / "eval" / path.name)
    parts += [f"![{p.stem}](eval/{p.name})\n" for p in plots]
    return "\n".join(parts) or "The run's eval folder holds no results.\n"


def _usage(name: str, rope: dict, context: int, gguf_file: str | None, gguf_rope: str | None = None) -> str:
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
             "vLLM reads the YaRN keys from config.json (no flags needed):", "", "```bash",
             f"vllm serve {name} --max-model-len {context}", "```"]
    if gguf_file:
        lines += ["", "llama.cpp reads YaRN from the GGUF metadata:", "", "```bash",
                  f"llama-cli -m {gguf_file} -c {context}"]
        if gguf_rope == "freq_factors":
            lines += ["# the GGUF carries this YaRN as per-pair frequency factors (rope_freqs.weight): do not pass",
                      "# --rope-scaling or --rope-scale, they would scale the frequencies a second time"]
        elif rope.get("rope_type") == "yarn":
            lines += ["# or explicitly:",
                      f"llama-cli -m {gguf_file} -c {context} --rope-scaling yarn --rope-scale {rope['factor']:g} "
                      f"--yarn-orig-ctx {rope['original_max_position_embeddings']}"]
        lines.append("```")
    return "\n".join(lines) + "\n"


def _checks(report: dict) -> str:
    lines = []
    for key in ("hf_check", "gguf_check"):
        check = report.get(key)
        if check:
            lines.append(f"- {check['loader']}: max relative logit difference {check['max_relative_difference']:.3g} "
                         f"(tolerance {check['tolerance']:g}) on a {check['prompt_tokens']}-token prompt")
    config_check = report.get("config_check") or {}
    if "vllm_max_model_len" in config_check:
        lines.append(f"- vLLM key check passed; vLLM derives max_model_len = {config_check['vllm_max_model_len']}")
    lines += [f"- note: {w}" for w in config_check.get("warnings", [])]
    return "\n".join(lines) + "\n" if lines else "Verification was skipped (--no-verify).\n"


def write_card(out: Path, report: dict, source, name: str) -> None:
    """Write out/README.md; `name` is the final folder name (out may be a temp dir)."""
    recipe = source.recipe()
    base = report.get("base_model") or (recipe.get("model") or {}).get("name_or_path") or "unknown"
    rope = main_rope_dict(report["rope_parameters"])
    context = report["max_position_embeddings"]
    data = recipe.get("data")
    front = {"library_name": "transformers", "tags": ["yarn", "long-context", "yarnkit"]}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)) and not Path(str(base)).exists():
        front["base_model"] = base  # only a Hub id: the Hub rejects local paths here
    sections = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"Context-extended with yarnkit from **{base}**: RoPE `{rope.get('rope_type')}`"
        + (f" x{rope['factor']:g}, {rope['original_max_position_embeddings']} -> {context} tokens."
           if rope.get("rope_type") == "yarn" else "."), "",
        "## YaRN parameters", "", "```json", json.dumps(report["rope_parameters"], indent=2, default=str), "```", "",
        *[f"- {note}" for note in report.get("notes", [])], "",
        "## Training data", "", f"```yaml\n{yaml.safe_dump(data, sort_keys=False)}```" if data else "Not recorded.", "",
        "## Recipe", "", f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```" if recipe else "No recipe (plain model folder).",
        "", "## Evaluation", "", eval_section(source.run_dir, out),
        "## Export verification", "", _checks(report),
        "## How to load", "", _usage(report.get("hub_repo") or name, rope, context, report.get("gguf_file"),
                                        report.get("gguf_rope")),
    ]
    (out / "README.md").write_text("\n".join(sections))
