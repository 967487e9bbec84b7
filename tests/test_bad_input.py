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
import hashlib
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
    ("recipe-precision", [*TRAIN, "train.mixed_precision=fp8"], "'fp8'", "choose fp32, bf16 or fp16"),
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
    # serve (what the CLI boundary sees; HTTP-level errors are tested with the server)
    ("serve-not-a-model", ["serve", "{root}/notmodel", "--port", "0"], "notmodel", "HF model folder"),
    ("serve-window-zero", ["serve", "{root}/model", "--window", "0", "--port", "0"], "--window 0", "--window 1024"),
    ("serve-device", ["serve", "{root}/model", "--device", "cuda", "--port", "0"], "'cuda'", "--device cpu"),
    ("serve-port-out-of-range", ["serve", "{root}/model", "--port", "70000"], "--port 70000", "1..65535"),
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
