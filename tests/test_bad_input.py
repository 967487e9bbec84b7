"""Bad input to every command fails gracefully and loses nothing: one table of cases, each run through the CLI.

    python -m pytest tests/test_bad_input.py -q

Each case asserts a non-zero exit, exactly one error line that names the offending value and the fix, no
traceback, and that nothing under the inputs changed (the whole input folder is hashed before and after: file
contents, modes and the set of paths, so a half-written output folder counts). Most cases run in-process through
`yarnkit.cli.main([...])` with the file descriptors captured; a few run as real subprocesses (scripts/train.py,
the data-loss reproduction of issue 18, a busy port). Inputs are tiny and built here: a 2-layer Llama with a
384-token BPE, a run folder as the trainer writes it, torn weights, a text file named .gguf, a GPT-2 config, RoPE
settings stock loaders would read differently (dynamic_yarn, a string truncate).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from export_fixtures import YARN, make_run, tiny_bpe_tokenizer, tiny_yarn_model  # noqa: E402

from yarnkit import model_files  # noqa: E402
from yarnkit.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 120  # an in-process case that has not failed by then (a server that started) fails the test
PROGRESS_LINE = re.compile(r"it/s\]|s/it\]|\d+%\|")  # tqdm bars (weights loading) are not messages


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The input folder every case reads (and must leave exactly as it was)."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("inputs")
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # chat cases that fail after loading print no no-template notice
    model = tiny_yarn_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    make_run(root, model, tokenizer, with_eval=False)  # root/run/checkpoints/step_000400/{model,state,recipe.yaml}
    (root / "torn").mkdir()
    for item in (root / "model").iterdir():
        (root / "torn" / item.name).write_bytes(item.read_bytes())
    weights = (root / "torn" / "model.safetensors").read_bytes()
    (root / "torn" / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # a killed copy
    dynamic = tiny_yarn_model(rope={**YARN, "rope_type": "dynamic_yarn"})  # trained as yarn.rope_type=dynamic_yarn
    dynamic.save_pretrained(root / "dynyarn")
    tokenizer.save_pretrained(root / "dynyarn")
    (root / "truncstr").mkdir()
    for item in (root / "model").iterdir():
        (root / "truncstr" / item.name).write_bytes(item.read_bytes())
    config = json.loads((root / "truncstr" / "config.json").read_text())
    config["rope_parameters"]["truncate"] = "false"  # a hand edit loaders read as true
    (root / "truncstr" / "config.json").write_text(json.dumps(config))
    (root / "notmodel").mkdir()
    (root / "notmodel" / "notes.txt").write_text("my notes, not a model\n")
    (root / "text.gguf").write_text("this is a text file, not a GGUF\n")
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=4).save_pretrained(root / "gpt2")
    (root / "empty.txt").write_text("")
    (root / "book.txt").write_text("It was the best of times, it was the worst of times. " * 40)
    (root / "nofield.jsonl").write_text(json.dumps({"content": "a document"}) + "\n")
    (root / "badline.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (root / "emptydir").mkdir()
    (root / "bad.yaml").write_text("optim:\n  lr: [1e-4\n")
    (root / "list.yaml").write_text("- optim\n- lr\n")
    (root / "notjson.json").write_text("{not json")
    (root / "notresult.json").write_text(json.dumps({"rows": []}))
    (root / "ppl.json").write_text(json.dumps({"task": "ppl", "label": "a", "rows": [{"length": 8, "skipped": "x"}]}))
    (root / "passkey.json").write_text(json.dumps({"task": "passkey", "label": "b", "cells": [], "skipped": []}))
    (root / "userdir").mkdir()
    (root / "userdir" / "keep.txt").write_text("a user's own file\n")
    (root / "afile").write_text("a file where a folder is expected\n")
    for name, config in BROKEN_CONFIGS.items():  # the model folder with its config.json spoiled
        (root / name).mkdir()
        for item in (root / "model").iterdir():
            (root / name / item.name).write_bytes(item.read_bytes())
        original = json.loads((root / "model" / "config.json").read_text())
        (root / name / "config.json").write_text(config(original) if callable(config) else config)
    (root / "noweights").mkdir()
    for item in (root / "model").iterdir():
        if not item.name.endswith(".safetensors"):
            (root / "noweights" / item.name).write_bytes(item.read_bytes())
    (root / "latin1.txt").write_bytes("Les misérables, café au lait. ".encode("latin-1") * 40)
    (root / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    (root / "notgzip.txt.gz").write_text("plain text wearing a .gz name\n" * 40)
    whole = gzip.compress((root / "book.txt").read_bytes() + bytes(range(256)) * 64)
    (root / "truncated.txt.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (root / "numberfield.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    state = root / "trained" / "checkpoints" / "step_000001" / "state"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text(json.dumps({"step": 1, "samples_seen": 1, "tokens_seen": 64}))
    return root


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub (answered at once) and a private yarnkit cache outside the hashed inputs."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("YARNKIT_CACHE", str(cache))
        patch.delenv("YARNKIT_DEBUG", raising=False)
        model_files.hub_reachable.cache_clear()
        yield cache
    model_files.hub_reachable.cache_clear()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the train cases made one (fp32, CPU)


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_mode:o}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
BROKEN_CONFIGS = {  # folder -> config.json text (or a function of the good one)
    "badjson": "{not json",
    "emptyjson": "",
    "listjson": "[1, 2]",
    "typedconfig": lambda c: json.dumps({**c, "num_hidden_layers": "two"}),
    "unknowntype": lambda c: json.dumps({**c, "model_type": "llamma"}),
    "notype": lambda c: json.dumps({k: v for k, v in c.items() if k != "model_type"}),
}
UNWRITABLE = "/sys/yarnkit-out"  # a folder no one may create, root included (sysfs; read-only in containers)
TRAIN = ["train", "model.name_or_path={root}/model", "run_dir={root}/out/train", "data.seq_len=64",
         "train.mixed_precision=fp32", "train.max_steps=1", "model.gradient_checkpointing=false"]
OUT = "{root}/out/eval"

# (case id, argv with {root}, the value the line must name, a piece of the fix it must give)
CASES = [
    # recipe
    ("recipe-malformed-list", [*TRAIN, "optim.betas=[0.9"], "optim.betas", "close its brackets"),
    ("recipe-unknown-key", [*TRAIN, "optim.lrr=1e-4"], "optim.lrr", "did you mean 'optim.lr'"),
    ("recipe-unknown-recipe", [*TRAIN, "recipe=tinny"], "tinny", "did you mean 'tiny'"),
    ("recipe-wrong-type", [*TRAIN, "train.max_steps=abc"], "train.max_steps", "key's type"),
    ("recipe-not-key-value", [*TRAIN, "tiny"], "'tiny'", "example: recipe=tiny"),
    ("recipe-bad-yaml-file", [*TRAIN, "recipe={root}/bad.yaml"], "bad.yaml:3", "fix the file"),
    ("recipe-yaml-list", [*TRAIN, "recipe={root}/list.yaml"], "list.yaml", "section:"),
    ("recipe-missing-file", [*TRAIN, "recipe={root}/nope.yaml"], "nope.yaml", "check the path"),
    ("recipe-section-as-value", [*TRAIN, "optim=3"], "'optim'", "optim.<field>="),
    ("recipe-seq-len-too-short", [*TRAIN, "data.seq_len=1"], "data.seq_len=1", "at least 2"),
    ("recipe-shrinking-factor", [*TRAIN, "yarn.factor=0.5"], "yarn.factor=0.5", "use 1 (off) or more"),
    ("recipe-precision", [*TRAIN, "train.mixed_precision=fp8"], "'fp8'", "choose fp32, bf16, fp16 or bf16-weights"),
    ("recipe-seq-beyond-context", [*TRAIN, "data.seq_len=4096"], "data.seq_len=4096", "raise yarn.factor"),
    ("recipe-model-not-a-model", [*TRAIN, "model.name_or_path={root}/notmodel"], "notmodel", "HF model folder"),
    ("recipe-offline-hub-id", [*TRAIN, "model.name_or_path=nobody/nothing", "--dry-run"], "'nobody/nothing'",
     "offline machines need"),
    # data
    ("data-empty-file", [*TRAIN, "data.source={root}/empty.txt"], "empty.txt", "files with text"),
    ("data-jsonl-without-field", [*TRAIN, "data.source={root}/nofield.jsonl"], "nofield.jsonl:1",
     "data.text_field="),
    ("data-jsonl-bad-line", [*TRAIN, "data.source={root}/badline.jsonl"], "badline.jsonl:2", "one JSON object"),
    ("data-missing-path", [*TRAIN, "data.source={root}/nowhere.txt"], "nowhere.txt", "set data.source"),
    ("data-glob-no-match", [*TRAIN, "data.source={root}/nothing*.txt"], "nothing*.txt", "check the pattern"),
    ("data-folder-without-text", [*TRAIN, "data.source={root}/emptydir"], "emptydir", "folder holding"),
    # train
    ("train-resume-not-a-checkpoint", [*TRAIN, "resume={root}/notmodel"], "notmodel", "step_NNNNNN"),
    ("train-resume-none-over-checkpoints", [*TRAIN, "run_dir={root}/trained", "resume=none"], "trained",
     "resume=auto"),
    ("train-torn-weights", [*TRAIN, "model.name_or_path={root}/torn"], "model.safetensors", "earlier checkpoint"),
    ("train-unknown-flag", ["train", "recipe=tiny", "--dryrun"], "--dryrun", "yarnkit train --help"),
    # export
    ("export-out-is-source", ["export", "{root}/run", "--out", "{root}/run", "--overwrite"], "is the export source",
     "new folder"),
    ("export-out-inside-source", ["export", "{root}/run", "--out", "{root}/run/exports/x"], "inside the export source",
     "outside it"),
    ("export-out-contains-source", ["export", "{root}/run/checkpoints/step_000400", "--out", "{root}/run",
                                    "--overwrite"], "contains the export source", "outside it"),
    ("export-overwrite-user-folder", ["export", "{root}/run", "--out", "{root}/userdir", "--overwrite"], "keep.txt",
     "only replaces an earlier export"),
    ("export-out-is-a-file", ["export", "{root}/run", "--out", "{root}/afile"], "afile", "folder path"),
    ("export-out-not-empty", ["export", "{root}/run", "--out", "{root}/userdir"], "userdir", "--overwrite"),
    ("export-missing-source", ["export", "{root}/gone", "--out", "{root}/out/x"], "gone", "RUN dir"),
    ("export-not-a-model", ["export", "{root}/notmodel", "--out", "{root}/out/x"], "notmodel", "adapter_config"),
    ("export-torn-weights", ["export", "{root}/torn", "--out", "{root}/out/x"], "model.safetensors",
     "earlier checkpoint"),
    ("export-no-out", ["export", "{root}/run"], "--out DIR", "--out exports/run"),
    ("export-bad-gguf-type", ["export", "{root}/run", "--out", "{root}/out/x", "--gguf-type", "q3"], "'q3'",
     "yarnkit export --help"),
    ("export-device-missing", ["export", "{root}/run", "--out", "{root}/out/x", "--device", "cuda"], "'cuda'",
     "--device cpu"),
    ("export-rope-loaders-misread", ["export", "{root}/dynyarn", "--out", "{root}/out/x"],
     "rope_type 'dynamic_yarn' with finetuned=false", "yarn.rope_type=yarn"),
    ("export-rope-truncate-not-bool", ["export", "{root}/truncstr", "--out", "{root}/out/x"],
     "rope_parameters.truncate='false'", "JSON boolean"),
    ("export-push-only-not-an-export", ["export", "{root}/model", "--push-only", "--push-to-hub", "u/m"],
     "export_report.json", "--push-only --push-to-hub"),
    # info
    ("info-gpt2-factor", ["info", "{root}/gpt2", "--factor", "4"], "does not use RoPE", "leave out --factor"),
    ("info-text-gguf", ["info", "{root}/text.gguf"], "text.gguf is not a GGUF", "llama.cpp"),
    ("info-not-a-model", ["info", "{root}/notmodel"], "notmodel is not a model", "HF model folder"),
    ("info-missing-path", ["info", "{root}/nope"], "nope", "check the path"),
    ("info-factor-below-one", ["info", "{root}/model", "--factor", "0.5"], "--factor 0.5", "factor > 1"),
    ("info-plot-needs-factor", ["info", "{root}/model", "--plot", "{root}/out/p.png"], "--plot", "add --factor"),
    ("info-betas", ["info", "{root}/model", "--factor", "4", "--beta-fast", "1", "--beta-slow", "2"],
     "--beta-fast 1", "paper's 32 and 1"),
    # eval
    ("eval-passkey-depth", ["eval", "passkey", "{root}/model", "--depths", "1.5", "--out", OUT], "--depths 1.5",
     "--depths 0,0.25"),
    ("eval-ppl-lengths-beyond-book", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--lengths",
                                      "1000000", "--out", OUT], "--lengths 1000000", "pass lengths up to"),
    ("eval-ppl-empty-data", ["eval", "ppl", "{root}/model", "--data", "{root}/empty.txt", "--out", OUT], "empty.txt",
     "point --data at text"),
    ("eval-ppl-jsonl-field", ["eval", "ppl", "{root}/model", "--data", "{root}/nofield.jsonl", "--out", OUT],
     "'text'", "--field NAME"),
    ("eval-ppl-missing-data", ["eval", "ppl", "{root}/model", "--data", "{root}/nope.txt", "--out", OUT], "nope.txt",
     "pass a text/.gz file"),
    ("eval-factor-without-rope-type", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--factor", "4",
                                       "--out", OUT], "--rope-type and --factor", "--rope-type yarn --factor 8"),
    ("eval-dtype", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--dtype", "float13", "--out", OUT],
     "'float13'", "choose one of"),
    ("eval-device", ["eval", "passkey", "{root}/model", "--device", "cuda", "--out", OUT], "'cuda'", "--device cpu"),
    ("eval-lengths-not-numbers", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--lengths", "4k",
                                  "--out", OUT], "'4k'", "yarnkit eval ppl --help"),
    ("eval-not-a-model", ["eval", "ppl", "{root}/notmodel", "--data", "{root}/book.txt", "--out", OUT], "notmodel",
     "HF model folder"),
    ("eval-text-gguf", ["eval", "passkey", "{root}/text.gguf", "--out", OUT], "text.gguf", "llama.cpp"),
    ("eval-torn-weights", ["eval", "passkey", "{root}/torn", "--lengths", "64", "--out", OUT], "model.safetensors",
     "earlier checkpoint"),
    ("eval-trials-zero", ["eval", "passkey", "{root}/model", "--trials", "0", "--out", OUT], "--trials 0",
     "--trials 8"),
    ("eval-passkey-nothing-fits", ["eval", "passkey", "{root}/model", "--lengths", "16", "--out", OUT],
     "evaluated nothing", "at least one can run"),
    ("eval-stream-window", ["eval", "stream", "{root}/model", "--data", "{root}/book.txt", "--window", "0",
                            "--out", OUT], "--window 0", "--window 8"),
    ("eval-stream-policy", ["eval", "stream", "{root}/model", "--data", "{root}/book.txt", "--policy", "lru",
                            "--out", OUT], "'lru'", "--help"),
    ("eval-string-shift-within-window", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--string",
                                         "100,128", "--out", OUT], "S=100", "pass S > W"),
    ("eval-string-shift-beyond-context", ["eval", "passkey", "{root}/model", "--string", "5000", "--lengths", "64",
                                          "--out", OUT], "S=5000", "pass S < 1024"),
    ("eval-string-syntax", ["eval", "retrieval", "{root}/model", "--string", "1k", "--out", OUT], "'1k'",
     "--string 21845,128"),
    ("eval-string-window-policy", ["eval", "stream", "{root}/model", "--data", "{root}/book.txt", "--policy", "window",
                                   "--string", "300,16", "--out", OUT], "--policy window", "--policy dense"),
    ("eval-unknown-task", ["eval", "perplexity", "{root}/model"], "'perplexity'", "yarnkit eval --help"),
    # report
    ("report-missing-file", ["eval", "report", "{root}/missing.json"], "missing.json", "written by yarnkit eval"),
    ("report-not-json", ["eval", "report", "{root}/notjson.json"], "notjson.json is not JSON", "written by"),
    ("report-not-a-result", ["eval", "report", "{root}/notresult.json"], "notresult.json", "written by"),
    ("report-output-folder-missing", ["eval", "report", "{root}/ppl.json", "--output", "{root}/out/r.md"], "out/r.md",
     "create it first"),
    ("report-plot-mixed-tasks", ["eval", "plot", "{root}/ppl.json", "{root}/passkey.json", "--out",
                                 "{root}/out/p.png"], "different tasks", "separately"),
    ("report-plot-nothing-measured", ["eval", "plot", "{root}/ppl.json", "--out", "{root}/out/p.png"],
     "every row was skipped", "evaluated something"),
    # chat
    ("chat-not-a-model", ["chat", "{root}/notmodel", "--prompt", "hi"], "notmodel", "HF model folder"),
    ("chat-window-zero", ["chat", "{root}/model", "--window", "0", "--prompt", "hi"], "--window 0", "--window 1024"),
    ("chat-device", ["chat", "{root}/model", "--device", "cuda", "--prompt", "hi"], "'cuda'", "--device cpu"),
    ("chat-dtype", ["chat", "{root}/model", "--dtype", "float13", "--prompt", "hi"], "'float13'", "choose one of"),
    ("chat-torn-weights", ["chat", "{root}/torn", "--prompt", "hi"], "model.safetensors", "earlier checkpoint"),
    ("chat-text-gguf", ["chat", "{root}/text.gguf", "--prompt", "hi"], "text.gguf", "llama.cpp"),
    ("chat-string-beyond-window", ["chat", "{root}/model", "--string", "2000", "--prompt", "hi"], "S=2000",
     "pass S < 1024"),
    ("chat-string-compile", ["chat", "{root}/model", "--string", "300,16", "--compile", "--prompt", "hi"],
     "--compile with --string", "leave out --compile"),
    # serve (what the CLI boundary sees; HTTP-level errors are tested with the server)
    ("serve-string-graph", ["serve", "{root}/model", "--string", "300,16", "--decode", "graph", "--port", "0"],
     "--decode graph with --string", "--decode static"),
    ("serve-string-window", ["serve", "{root}/model", "--string", "64,128", "--port", "0"], "S=64", "pass S > W"),
    ("serve-not-a-model", ["serve", "{root}/notmodel", "--port", "0"], "notmodel", "HF model folder"),
    ("serve-window-zero", ["serve", "{root}/model", "--window", "0", "--port", "0"], "--window 0", "--window 1024"),
    ("serve-device", ["serve", "{root}/model", "--device", "cuda", "--port", "0"], "'cuda'", "--device cpu"),
    ("serve-port-out-of-range", ["serve", "{root}/model", "--port", "70000"], "--port 70000", "1..65535"),
]

# Every command given a model folder whose config.json or weights are broken (the value, the fix).
BROKEN_MODELS = {
    "badjson": ("badjson/config.json is not valid JSON", "restore it"),
    "emptyjson": ("emptyjson/config.json is not valid JSON", "restore it"),
    "listjson": ("holds a JSON list", "restore it"),
    "typedconfig": ("typedconfig/config.json has a field transformers cannot use", "restore it"),
    "unknowntype": ("model_type 'llamma'", "did you mean 'llama'"),
    "notype": ("notype/config.json has no model_type", '"model_type": "llama"'),
    "noweights": ("noweights has a config.json but no *.safetensors", "copy the weights"),
}
MODEL_COMMANDS = {  # command -> argv with {model}
    "info": ["info", "{model}"],
    "train": [*TRAIN[:1], "model.name_or_path={model}", *TRAIN[2:]],
    "export": ["export", "{model}", "--out", "{root}/out/x"],
    "chat": ["chat", "{model}", "--prompt", "hi"],
    "serve": ["serve", "{model}", "--port", "0"],
    "eval-ppl": ["eval", "ppl", "{model}", "--data", "{root}/book.txt", "--lengths", "64", "--out", OUT],
    "eval-passkey": ["eval", "passkey", "{model}", "--lengths", "64", "--out", OUT],
    "eval-stream": ["eval", "stream", "{model}", "--data", "{root}/book.txt", "--max-tokens", "64", "--out", OUT],
}
for folder, (value, fix) in BROKEN_MODELS.items():
    for command, argv in MODEL_COMMANDS.items():
        if folder == "noweights" and command == "info":
            continue  # info reads the config only: a model without weights is fine there
        named = ("no model weights in {root}/noweights", "expected *.safetensors") if (
            folder == "noweights" and command == "export") else (value, fix)  # export's own check comes first
        CASES.append((f"{command}-{folder}", [arg.replace("{model}", "{root}/" + folder) for arg in argv], *named))

# chat and serve share their streaming flags: each value that cannot work fails before the model loads.
STREAM_FLAGS = [
    ("temperature-negative", ["--temperature", "-1"], "--temperature -1", "--temperature 0.7"),
    ("temperature-nan", ["--temperature", "nan"], "--temperature nan", "--temperature 0.7"),
    ("temperature-inf", ["--temperature", "inf"], "--temperature inf", "--temperature 0.7"),
    ("top-p-zero", ["--top-p", "0"], "--top-p 0", "--top-p 0.9"),
    ("top-p-above-one", ["--top-p", "1.5"], "--top-p 1.5", "--top-p 0.9"),
    ("evict-batch-zero", ["--evict-batch", "0"], "--evict-batch 0", "--evict-batch 64"),
    ("compress-rate-two", ["--compress-rate", "2"], "--compress-rate 2", "--compress-rate 0.5"),
    ("compress-rate-zero", ["--compress-rate", "0"], "--compress-rate 0", "--compress-rate 0.5"),
    ("compress-over-zero", ["--compress-over", "0"], "--compress-over 0", "--compress-over 512"),
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], "--max-new-tokens 0", "--max-new-tokens 256"),
    ("max-new-tokens-negative", ["--max-new-tokens", "-5"], "--max-new-tokens -5", "--max-new-tokens 256"),
    ("seed-above-64-bits", ["--seed", str(2**70), "--temperature", "0.7"], f"--seed {2**70}", "--seed 0"),
    ("seed-below-64-bits", ["--seed", str(-2**63 - 1)], f"--seed {-2**63 - 1}", "--seed 0"),
    ("decode-graph-on-cpu", ["--decode", "graph"], "--decode graph needs a CUDA GPU", "--decode auto or static"),
    ("fuse-maybe", ["--fuse", "maybe"], "argument --fuse: invalid choice: 'maybe'", "--help"),
    ("compile-on-cpu", ["--compile"], "--compile", "leave out --compile"),
    ("sinks-negative", ["--sinks", "-1"], "--sinks -1", "--sinks 4"),
    ("sinks-fill-window", ["--window", "8", "--sinks", "8"], "--sinks 8", "--sinks 4"),
    ("sirllm-decay-zero", ["--sirllm-decay", "0"], "--sirllm-decay 0", "--sirllm-decay 0.9"),
    ("sirllm-keep-negative", ["--sirllm-keep", "-1"], "--sirllm-keep -1", "--sirllm-keep 64"),
    ("window-negative", ["--window", "-4"], "--window -4", "--window 1024"),
    ("window-beyond-memory", ["--window", str(10**10), "--decode", "static"], f"--window {10**10} x",
     "lower --window"),
]
for name, flags, value, fix in STREAM_FLAGS:
    CASES.append((f"chat-{name}", ["chat", "{root}/model", *flags, "--prompt", "hi"], value, fix))
    CASES.append((f"serve-{name}", ["serve", "{root}/model", *flags, "--port", "0"], value, fix))

# Recipe values that cannot work fail before anything is written (recipe.yaml included).
RECIPE_VALUES = [
    ("optim.lr=-1", "optim.lr=-1.0", "optim.lr=2e-5"),
    ("optim.lr=nan", "optim.lr=nan", "optim.lr=2e-5"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]", "optim.betas=[0.9,0.95]"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]", "optim.betas=[0.9,0.95]"),
    ("optim.eps=-1e-8", "optim.eps=-1e-08", "optim.eps=1e-8"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1", "optim.weight_decay=0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1", "optim.warmup_steps=20"),
    ("optim.schedule_steps=-5", "optim.schedule_steps=-5", "optim.schedule_steps=0"),
    ("optim.fused=maybe", "optim.fused='maybe'", "auto, true or false"),
    ("optim.schedule=cosine", "optim.schedule='cosine'", "linear or constant"),
    ("yarn.rope_type=yarnn", "yarn.rope_type='yarnn'", "did you mean 'yarn'"),
    ("yarn.rope_type=rope", "yarn.rope_type='rope'", "choose one of linear"),
    ("yarn.factor=inf", "yarn.factor=inf", "yarn.factor=4"),
    ("yarn.factor=nan", "yarn.factor=nan", "yarn.factor=4"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0", "checkpoint.keep_last=2"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1", "checkpoint.keep_last=2"),
    ("checkpoint.every=-1", "checkpoint.every=-1", "checkpoint.every=100"),
    ("train.clip=-1", "train.clip=-1.0", "train.clip=1.0"),
    ("train.log_every=0", "train.log_every=0", "train.log_every=1"),
    ("train.loss_chunk_tokens=0", "train.loss_chunk_tokens=0", "train.loss_chunk_tokens=4096"),
    ("train.peak_tflops=0", "train.peak_tflops=0.0", "train.peak_tflops=989"),
    ("lora.dropout=2", "lora.dropout=2.0", "lora.dropout=0.05"),
    ("train.micro_batch_size=100000000", "estimated", "train.memory_check=false"),
    ("yarn.factor=4", "model.name_or_path={root}/model already uses rope_type 'yarn'", "yarn.replace=true"),
]
for override, value, fix in RECIPE_VALUES:
    extra = ["lora.enabled=true"] if override.startswith("lora.") else []
    CASES.append((f"recipe-{override}", [*TRAIN, *extra, override], value, fix))

# Data that is not what it says: named with its path (and line or byte), in every command that reads data.
BAD_DATA = [
    ("latin1-text", "latin1.txt", "latin1.txt is not UTF-8 text (byte 7", "iconv -f latin1"),
    ("latin1-jsonl", "latin1.jsonl", "latin1.jsonl:2 is not UTF-8 text", "iconv -f latin1"),
    ("not-gzip", "notgzip.txt.gz", "notgzip.txt.gz is not a gzip file", "re-compress it with gzip"),
    ("truncated-gzip", "truncated.txt.gz", "truncated.txt.gz is not a gzip file", "re-compress it with gzip"),
    ("number-field", "numberfield.jsonl", "numberfield.jsonl:1: field 'text' holds a int", "--field NAME"),
]
for name, data, value, fix in BAD_DATA:
    CASES.append((f"data-{name}", [*TRAIN, "data.source={root}/" + data], value, fix))
    CASES.append((f"eval-ppl-{name}", ["eval", "ppl", "{root}/model", "--data", "{root}/" + data, "--lengths", "16",
                                       "--out", OUT], value, fix))
    CASES.append((f"eval-stream-{name}", ["eval", "stream", "{root}/model", "--data", "{root}/" + data,
                                          "--max-tokens", "32", "--out", OUT], value, fix))
for name, data, value, fix in [BAD_DATA[0], *BAD_DATA[2:4]]:  # a haystack is read as text, never as .jsonl
    CASES.append((f"eval-needle-{name}", ["eval", "needle", "{root}/model", "--haystack", "{root}/" + data,
                                          "--lengths", "64", "--out", OUT], value, fix))

# Outputs that cannot be written fail before the long work: a file where a folder goes, a path through a file,
# a folder that takes no files, a plot format matplotlib cannot write.
OUTPUT_FOLDERS = {
    "train": [*TRAIN, "run_dir={out}"],
    "export": ["export", "{root}/run", "--out", "{out}"],
    "eval-ppl": ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--lengths", "64", "--out", "{out}"],
    "eval-passkey": ["eval", "passkey", "{root}/model", "--lengths", "64", "--out", "{out}"],
    "eval-needle": ["eval", "needle", "{root}/model", "--lengths", "64", "--out", "{out}"],
    "eval-stream": ["eval", "stream", "{root}/model", "--data", "{root}/book.txt", "--max-tokens", "64",
                    "--out", "{out}"],
    "eval-retrieval": ["eval", "retrieval", "{root}/model", "--lengths", "64", "--out", "{out}"],
}
for command, argv in OUTPUT_FOLDERS.items():
    flag = "run_dir=" if command == "train" else "--out "
    for kind, out, value, fix in (
            ("is-a-file", "{root}/afile", "afile is a file", "folder path"),
            ("under-a-file", "{root}/afile/sub", "afile is a file", "through folders only"),
            ("unwritable", UNWRITABLE, f"{flag}{UNWRITABLE}: cannot write in /sys", "a folder you can write to")):
        if command == "export" and kind == "is-a-file":
            continue  # already in the table above (export-out-is-a-file)
        CASES.append((f"{command}-out-{kind}", [arg.replace("{out}", out) for arg in argv], value, fix))
PLOT = ["eval", "plot", "{root}/ppl.json", "--out"]
REPORT = ["eval", "report", "{root}/ppl.json", "--output"]
INFO_PLOT = ["info", "{root}/model", "--factor", "4", "--plot"]
CASES += [
    ("plot-out-json", [*PLOT, "{root}/out/x.json"], "cannot write a .json file", "out/x.png"),
    ("plot-out-folder", [*PLOT, "{root}/emptydir"], "emptydir is a folder", "pass a file path"),
    ("plot-out-unwritable", [*PLOT, UNWRITABLE + "/p.png"], "cannot write in /sys", "a folder you can write to"),
    ("plot-out-under-a-file", [*PLOT, "{root}/afile/p.png"], "afile is a file", "through folders only"),
    ("report-output-unwritable", [*REPORT, "/sys/r.md"], "cannot write in /sys", "a folder you can write to"),
    ("report-output-folder", [*REPORT, "{root}/emptydir"], "emptydir is a folder", "pass a file path"),
    ("info-plot-json", [*INFO_PLOT, "{root}/p.json"], "cannot write a .json file", "/p.png"),
    ("info-plot-missing-folder", [*INFO_PLOT, "{root}/nowhere/p.png"], "the folder {root}/nowhere does not exist",
     "create it first"),
    ("info-plot-unwritable", [*INFO_PLOT, "/sys/p.png"], "cannot write in /sys", "a folder you can write to"),
    ("info-plot-folder", [*INFO_PLOT, "{root}/emptydir"], "emptydir is a folder", "pass a file path"),
    # numbers that are not numbers, sizes that are not sizes, flags that do not apply
    ("info-factor-inf", ["info", "{root}/model", "--factor", "inf"], "--factor inf", "--factor 4"),
    ("info-factor-nan", ["info", "{root}/model", "--factor", "nan"], "--factor nan", "factor > 1"),
    ("info-beta-fast-inf", ["info", "{root}/model", "--factor", "4", "--beta-fast", "inf"], "--beta-fast inf",
     "paper's 32 and 1"),
    ("export-shard-size-word", ["export", "{root}/run", "--out", "{root}/out/x", "--max-shard-size", "abc"],
     "--max-shard-size 'abc'", "2GB, 500MB"),
    ("export-shard-size-negative", ["export", "{root}/run", "--out", "{root}/out/x", "--max-shard-size=-5GB"],
     "--max-shard-size '-5GB'", "2GB, 500MB"),
    ("export-shard-size-zero", ["export", "{root}/run", "--out", "{root}/out/x", "--max-shard-size", "0"],
     "--max-shard-size '0'", "2GB, 500MB"),
    ("export-verify-tokens-beyond-context", ["export", "{root}/run", "--out", "{root}/out/x", "--verify-tokens",
                                             "99999999999"], "--verify-tokens 99999999999", "leave it out"),
    ("eval-lengths-beyond-an-index", ["eval", "passkey", "{root}/model", "--lengths", str(10**20), "--out", OUT],
     f"--lengths {10**20}", "--lengths 2048,4096"),
    ("eval-factor-inf", ["eval", "ppl", "{root}/model", "--data", "{root}/book.txt", "--rope-type", "yarn",
                         "--factor", "1e400", "--out", OUT], "--factor inf", "--factor 4"),
    ("eval-rope-type-on-a-scaled-model", ["eval", "passkey", "{root}/model", "--rope-type", "yarn", "--factor", "4",
                                          "--lengths", "64", "--out", OUT], "already uses rope_type 'yarn'",
     "leave out --rope-type/--factor"),
    ("export-merge-lora-without-lora", ["export", "{root}/run", "--out", "{root}/out/x", "--merge-lora"],
     "no LoRA adapter to merge", "leave out --merge-lora"),
    ("chat-system-not-utf8", ["chat", "{root}/model", "--system", "caf\udce9", "--prompt", "hi"],
     "--system is not UTF-8 text", "UTF-8"),
    ("chat-prompt-not-utf8", ["chat", "{root}/model", "--prompt", "caf\udce9"], "--prompt is not UTF-8 text",
     "iconv -f latin1"),
]
STDIN_CASES = [  # (case id, argv, stdin bytes, value, fix)
    ("chat-prompt-stdin-not-utf8", ["chat", "{root}/model", "--prompt", "-"], "café\n".encode("latin-1"),
     "--prompt -: stdin is not UTF-8 text (byte 3", "iconv -f latin1"),
    ("chat-piped-line-not-utf8", ["chat", "{root}/model"], "hello\ncafé\n".encode("latin-1"),
     "a line of stdin is not UTF-8 text", "iconv -f latin1"),
    ("chat-prompt-stdin-empty", ["chat", "{root}/model", "--prompt", "-"], b"  \n", "empty prompt",
     "--prompt -"),
]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not PROGRESS_LINE.search(line)]


def check_failure(code: int, out: str, err: str, value: str, fix: str) -> None:
    assert code not in (0, None), f"exit {code}: {out[-500:]} {err[-500:]}"
    assert "Traceback" not in out + err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n" + "\n".join(lines[-20:])
    assert lines[0].startswith("yarnkit: error: "), lines[0]
    assert value in lines[0] and fix in lines[0], f"{value!r} / {fix!r} not both in: {lines[0]}"


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: the command should have failed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("argv, value, fix", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_with_one_line_and_changes_nothing(inputs, offline, capfd, argv, value, fix):
    before = tree_hash(inputs)
    with time_limit(CASE_SECONDS):
        code = main([arg.format(root=inputs) for arg in argv])
    out, err = capfd.readouterr()
    check_failure(code, out, err, value.format(root=inputs), fix)
    assert tree_hash(inputs) == before, "the failed command changed its inputs"


@pytest.mark.parametrize("argv, stdin, value, fix", [case[1:] for case in STDIN_CASES],
                         ids=[case[0] for case in STDIN_CASES])
def test_bad_stdin_fails_with_one_line_and_changes_nothing(inputs, offline, capfd, monkeypatch, argv, stdin, value,
                                                           fix):
    """Piped stdin as Python decodes it in a UTF-8 locale (surrogate escapes for other bytes)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8",
                                                       errors="surrogateescape"))
    before = tree_hash(inputs)
    with time_limit(CASE_SECONDS):
        code = main([arg.format(root=inputs) for arg in argv])
    out, err = capfd.readouterr()
    check_failure(code, out, err, value.format(root=inputs), fix)
    assert tree_hash(inputs) == before


@pytest.mark.parametrize("task", ["ppl", "passkey", "stream", "retrieval"])
def test_eval_refuses_an_unwritable_out_before_evaluating(inputs, offline, capfd, monkeypatch, task):
    """The results would be written after the whole evaluation: the output folder is checked before any model
    loads, so nothing is evaluated (and lost)."""
    import yarnkit.eval.tasks

    def evaluate(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(yarnkit.eval.tasks, "load_for_eval", evaluate)
    data = ["--data", str(inputs / "book.txt")] if task in ("ppl", "stream") else []
    assert main(["eval", task, str(inputs / "model"), *data, "--out", UNWRITABLE]) == 2
    assert f"--out {UNWRITABLE}: cannot write" in capfd.readouterr().err


def test_the_table_covers_every_command():
    """Each `yarnkit` command (and each eval task) has bad-input cases here; the sweep counts them all."""
    from yarnkit.cli import COMMANDS
    from yarnkit.eval.cli import TASKS

    argvs = [case[1] for case in CASES] + [case[1] for case in STDIN_CASES]
    assert {argv[0] for argv in argvs} == set(COMMANDS)
    assert {argv[1] for argv in argvs if argv[0] == "eval"} >= set(TASKS) | {"plot", "report"}
    assert len(argvs) >= 180, len(argvs)


def run_cli(*argv, cwd=REPO, env_extra=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("YARNKIT_DEBUG", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_issue_18_data_loss_reproduction_is_refused(inputs, offline):
    """`yarnkit export RUN --out RUN --overwrite` used to print "exported to RUN" after deleting its checkpoints."""
    before = tree_hash(inputs)
    done = run_cli("-m", "yarnkit.cli", "export", str(inputs / "run"), "--out", str(inputs / "run"), "--overwrite",
                   env_extra={"YARNKIT_CACHE": str(offline)})
    check_failure(done.returncode, done.stdout, done.stderr, f"--out {inputs / 'run'} is the export source itself",
                  f"--out {inputs / 'run-export'}")
    assert tree_hash(inputs) == before and (inputs / "run" / "checkpoints" / "step_000400" / "model").is_dir()


def test_scripts_train_goes_through_the_same_boundary(inputs, offline):
    done = run_cli("scripts/train.py", "recipe=tiny", "optim.betas=[0.9", env_extra={"YARNKIT_CACHE": str(offline)})
    check_failure(done.returncode, done.stdout, done.stderr, "optim.betas", "optim.betas=[0.9,0.95]")
    assert done.returncode == 2


def test_busy_port_fails_before_the_model_loads(inputs, offline):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        before = tree_hash(inputs)
        done = run_cli("-m", "yarnkit.cli", "serve", str(inputs / "model"), "--port", str(port),
                       env_extra={"YARNKIT_CACHE": str(offline)}, timeout=120)
    check_failure(done.returncode, done.stdout, done.stderr, f"port {port} on 127.0.0.1 is already in use", "--port")
    assert tree_hash(inputs) == before


def test_serve_without_its_server_libraries_is_one_line(inputs, offline, capfd, monkeypatch):
    """A broken install (fastapi 0.165 without its opentelemetry-api) fails before the model loads."""
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    with time_limit(CASE_SECONDS):
        code = main(["serve", str(inputs / "model"), "--port", "0"])
    out, err = capfd.readouterr()
    check_failure(code, out, err, "yarnkit serve cannot start: import of fastapi halted", "pip install -U fastapi")
    assert "Loading weights" not in out + err


def test_debug_shows_the_traceback_and_unknown_errors_keep_theirs(inputs, offline, capfd, monkeypatch):
    argv = ["info", str(inputs / "notmodel")]
    assert main([*argv, "--debug"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("yarnkit: error: ")
    monkeypatch.setenv("YARNKIT_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capfd.readouterr().err
    monkeypatch.delenv("YARNKIT_DEBUG")

    import yarnkit.info

    def broken(args):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(yarnkit.info, "run", broken)
    with pytest.raises(ZeroDivisionError):  # not swallowed: the traceback reaches the user
        main(argv)


def test_info_says_no_rope_for_gpt2(inputs, offline, capfd):
    assert main(["info", str(inputs / "gpt2")]) == 0
    out = capfd.readouterr().out
    assert "(no RoPE)" in out and "rotary" not in out.split("(no RoPE)")[0].splitlines()[-1]
    assert main(["info", str(inputs / "gpt2"), "--json"]) == 0
    info = json.loads(capfd.readouterr().out)
    assert info["uses_rope"] is False and info["rotary_dim"] is None


def test_every_flag_has_help_and_every_command_an_example(capsys):
    import argparse

    from yarnkit.cli import COMMANDS, Parser

    for name, (module_name, _) in COMMANDS.items():
        module = __import__(module_name, fromlist=["add_arguments"])
        parser = Parser(prog=f"yarnkit {name}", description=module.__doc__)
        module.add_arguments(parser)
        parsers = [(name, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {task}", sub) for task, sub in action.choices.items()]
        for label, each in parsers:
            missing = [a.dest for a in each._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
            assert not missing, f"yarnkit {label}: no help for {missing}"
            after_usage = each.format_help().split("\n\n", 1)[1]  # the usage line names the command anyway
            assert f"yarnkit {label}" in after_usage, f"yarnkit {label}: --help shows no example"
