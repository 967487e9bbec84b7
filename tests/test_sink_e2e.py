"""A sink-token model end to end: pretrained from scratch (tiny, byte-level BPE) -> `yarnkit export` to HF and GGUF
-> read back (HF config, GGUF metadata and token list, `load_model` of the GGUF with the same logits) -> the
conversation factory of `yarnkit chat` / `yarnkit serve` keeps exactly 1 sink (slot 0) through evictions, and
`--sinks 0` is allowed with a warning (the engine then evicts the sink); the attention-mass curve of the run's
checkpoints; and a 2-process CPU DeepSpeed ZeRO-3 run of a sink-token recipe, from scratch and by continued
training (the vocabulary then grows under sharded weights; equal to one process doing the same batch).

Run: python -m pytest tests/test_sink_e2e.py -q
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, tiny_model
from export_fixtures import tiny_bpe_tokenizer
from trainer_helpers import make_text_file, tiny_overrides
from yarnkit.recipe_files import accelerate_config
from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
SCRATCH = {"model.init": "scratch", "model.sink_token": True, "model.scratch.layers": 2, "model.scratch.hidden": 64,
           "model.scratch.heads": 4, "model.scratch.kv_heads": 2, "model.scratch.intermediate": 128,
           "model.scratch.context": 256, "yarn.factor": 1.0, "optim.lr": 1e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BPE model dir (config + tokenizer), a data file, and a 3-step from-scratch sink-token run."""
    root = tmp_path_factory.mktemp("sink-e2e")
    base = root / "base"
    tiny_config("llama", vocab_size=384).save_pretrained(base)
    tiny_bpe_tokenizer().save_pretrained(base)
    assets = {"model": base, "data": make_text_file(root / "data.txt.gz", 12_000), "cache": root / "cache",
              "root": root}
    run = train(load_recipe(overrides(assets, "run", **{"train.max_steps": 3, "checkpoint.every": 1})))
    return assets, Path(run.run_dir)


def overrides(assets, name, **extra):
    return tiny_overrides(assets["model"], assets["data"], assets["root"] / name, assets["cache"], **(SCRATCH | extra))


@pytest.fixture(scope="module")
def exported(setup):
    from yarnkit.export.cli import export

    assets, run = setup
    report = export(run, assets["root"] / "export", gguf=True, gguf_type="f32")
    return assets["root"] / "export", report


def test_export_keeps_the_sink_in_hf_and_gguf(exported):
    import gguf

    from yarnkit.export.gguf import read_metadata

    out, report = exported
    config = json.loads((out / "config.json").read_text())
    assert config["yarnkit_sink_token_id"] == 384 and config["vocab_size"] == 448  # 385 rows padded to 7 x 64
    assert report["config_check"]["sink_token_id"] == 384
    assert report["hf_check"]["passed"] and report["gguf_check"]["passed"]
    path = out / report["gguf_file"]
    assert read_metadata(path)["yarnkit.sink_token_id"] == 384
    reader = gguf.GGUFReader(str(path))
    tokens, types = reader.get_field("tokenizer.ggml.tokens"), reader.get_field("tokenizer.ggml.token_type")
    names = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert len(names) == 448 and names[384] == "<|sink|>" and kinds[384] == gguf.TokenType.CONTROL
    assert names[385] == "[PAD385]" and kinds[385] == gguf.TokenType.UNUSED  # padding rows: never produced


def test_gguf_round_trip_restores_the_sink_and_the_logits(exported, monkeypatch, tmp_path):
    from yarnkit.models import load_model

    out, report = exported
    monkeypatch.setenv("YARNKIT_CACHE", str(tmp_path))  # the GGUF -> HF conversion cache
    hf_model, hf_tokenizer = load_model(out)
    gguf_model, gguf_tokenizer = load_model(out / report["gguf_file"])
    assert gguf_model.config.yarnkit_sink_token_id == 384  # transformers alone drops yarnkit's key
    text = "It was the best of times, it was the worst of times."
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        batch = torch.tensor([[384] + ids])
        torch.testing.assert_close(gguf_model(batch).logits, hf_model(batch).logits, atol=1e-4, rtol=1e-4)


def conversation(command: str, location, *flags):
    from yarnkit.runtime import chat, serve
    from yarnkit.runtime.chat import build_conversation_factory
    from yarnkit.runtime.options import load_chat_model

    parser = argparse.ArgumentParser()
    (chat if command == "chat" else serve).add_arguments(parser)
    args = parser.parse_args([str(location), "--window", "40", "--max-new-tokens", "5", *flags])
    model, tokenizer = load_chat_model(args.ckpt, dtype=args.dtype, device=args.device)
    return build_conversation_factory(model, tokenizer, args)()


@pytest.mark.parametrize("command", ["chat", "serve"])
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_chat_and_serve_keep_exactly_one_sink(exported, command, kind, monkeypatch, tmp_path):
    out, report = exported
    monkeypatch.setenv("YARNKIT_CACHE", str(tmp_path))
    talk = conversation(command, out if kind == "hf" else out / report["gguf_file"])
    engine = talk.engine
    assert engine.options.sinks == 1 and engine.window == 40  # --window counts the sink
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    for turn in range(2):  # long turns: the 40-token cache evicts many times
        reply = "".join(talk.respond(messages + [{"role": "user", "content": "Tell me about the sea. " * 8}]))
        messages = talk.messages
        ids = engine.cache_ids.tolist()
        assert ids[0] == 384 and ids.count(384) == 1 and len(ids) <= engine.window, (turn, reply)
    assert engine.tokens_seen > 2 * engine.window and engine.stats()["sinks"] == 1


def test_zero_sinks_on_a_sink_token_model_is_allowed_with_a_warning(exported):
    from yarnkit.models import load_model
    from yarnkit.runtime.engine import StreamingEngine
    from yarnkit.sink_token import SinkTokenWarning

    out, _ = exported
    with pytest.warns(SinkTokenWarning, match="--sinks 0 lets it be evicted"):
        assert conversation("chat", out, "--sinks", "0").engine.options.sinks == 0  # the CLI's choice
    model, _ = load_model(out)
    with pytest.warns(SinkTokenWarning):
        engine = StreamingEngine(model, sinks=0, window=40)
    engine.feed(torch.arange(3, 103)[None])
    assert 384 not in engine.cache_ids.tolist() and len(engine) <= 40  # evicted like any other token


def test_attention_mass_over_the_runs_checkpoints(setup):
    from yarnkit.eval.attention_sinks import measure_run

    _, run = setup
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))

    def sequences_for(model):
        return torch.cat([torch.full((2, 1), model.config.yarnkit_sink_token_id), ids[:, :-1]], dim=1)

    rows = measure_run(run, sequences_for, "cpu")
    assert [row["step"] for row in rows] == [1, 2, 3] and len(rows[0]["mass"]) == 2
    assert [row["step"] for row in measure_run(run, sequences_for, "cpu", done={1, 2})] == [3]


def launch(assets, name, **extra) -> list[dict]:
    run_dir = assets["root"] / name
    items = overrides(assets, name, **{"train.max_steps": 2, "train.grad_accum": 1, "checkpoint.every": 0} | extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(accelerate_config("zero3")), "--num_processes", "2",
                           str(REPO / "tests" / "dist_probe.py"), *items], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(shutil.which("c++") is None, reason="DeepSpeed's CPU comm op needs a C++ compiler to JIT-build")
@pytest.mark.parametrize("start", ["scratch", "continued"])
def test_zero3_sink_token_run_on_two_cpu_processes(setup, start):
    """Continued training must equal one process doing the same batch (same pretrained start); from scratch,
    zero.Init draws the random weights shard by shard, so only the mechanics can be compared."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    assets, _ = setup
    extra = {"optim.lr": 1e-3}  # as in test_distributed.py: Adam makes lr-sized steps of 1e-7 reduction-order noise
    if start == "continued":  # a pretrained model whose vocabulary (384 = the tokenizer's) must grow for the sink
        base = assets["root"] / "pretrained"
        if not base.exists():
            tiny_model("llama", seed=0, vocab_size=384).save_pretrained(base)
            tiny_bpe_tokenizer().save_pretrained(base)
        extra |= {"model.init": "pretrained", "model.name_or_path": base}
    ranks = launch(assets, f"zero3-{start}", **extra)
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["distributed_type"] for r in ranks} == {"DEEPSPEED"}
    assert ranks[0]["samples"] == [0, 2, 4, 6] and ranks[1]["samples"] == [1, 3, 5, 7]
    model_dir = assets["root"] / f"zero3-{start}" / "checkpoints" / "step_000002" / "model"
    assert json.loads((model_dir / "config.json").read_text())["yarnkit_sink_token_id"] == 384
    saved = load_file(model_dir / "model.safetensors")  # gathered from the ZeRO-3 shards
    assert saved["model.embed_tokens.weight"].shape == (448, 64)
    assert all(torch.isfinite(t).all() for t in saved.values())
    losses = [ranks[0]["losses"][str(step)] for step in (1, 2)]
    assert all(abs(loss - ranks[1]["losses"][str(step)]) < 1e-6 for step, loss in zip((1, 2), losses))
    if start == "scratch":
        assert 5.0 < losses[0] < 7.0  # ~ln(448): a random model over the padded vocabulary, not NaN
        return
    single = train(load_recipe(overrides(assets, "single-continued", **{"train.max_steps": 2, "train.grad_accum": 2,
                                                                          "checkpoint.every": 0} | extra)))
    for step, loss in single.losses.items():  # 2 ranks x micro 2 == 1 process x micro 2 x accumulation 2
        assert ranks[0]["losses"][str(step)] == pytest.approx(loss, abs=1e-5)
    reference = load_file(Path(single.run_dir) / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
