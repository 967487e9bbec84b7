"""Dedicated sink token: tokenizer + embeddings, once per training sequence (PoSE too), trained row (full and LoRA),
id kept through checkpoint -> export -> runtime (1 sink), bad inputs refused, from-scratch init.

Run: python -m pytest tests/test_sink.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_helpers import char_tokenizer, make_text_file, make_tiny_model_dir, tiny_overrides
from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, chunk_tokens, micro_batch
from yarnkit.train.recipe import load_recipe
from yarnkit.errors import RecipeError, SinkTokenError
from yarnkit.sink_token import add_sink_token
from yarnkit.train.trainer import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sink")
    return {"model": make_tiny_model_dir(root / "model"), "data": make_text_file(root / "data.txt.gz", 8_000),
            "cache": root / "cache", "root": root}


def sink_overrides(assets, name, **extra):
    settings = {"model.sink_token": True, "train.max_steps": 2, "checkpoint.every": 0, "optim.lr": 1e-2} | extra
    return tiny_overrides(assets["model"], assets["data"], assets["root"] / name, assets["cache"], **settings)


def test_tied_embeddings_grow_one_row_initialised_from_bos():
    from conftest import tiny_model

    model, tokenizer = tiny_model("llama", seed=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True), char_tokenizer()
    old = model.get_input_embeddings().weight.detach().clone()
    sink = add_sink_token(model, tokenizer, "<|sink|>", init="bos")
    weight = model.get_input_embeddings().weight
    assert sink == 99 and len(tokenizer) == 100 and model.config.yarnkit_sink_token_id == 99
    assert weight.shape[0] == 128  # the tiny model's vocab (128) already has room: no resize needed
    torch.testing.assert_close(weight[sink], old[1])  # BOS's row, exactly
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied
    assert tokenizer("a<|sink|>b", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("a"),
                                                                             sink, tokenizer.convert_tokens_to_ids("b")]


def test_resize_when_vocab_is_full_and_refusals():
    from conftest import tiny_model

    model, tokenizer = tiny_model("llama", seed=0, vocab_size=99, tie_word_embeddings=True), char_tokenizer()
    old = model.get_input_embeddings().weight.detach().clone()
    sink = add_sink_token(model, tokenizer, "<|sink|>", init="mean")
    # 100 rows needed, padded to a multiple of 64 (tensor-core aligned head); the padding rows are the mean too
    assert sink == 99 and model.get_input_embeddings().weight.shape[0] == 128 and model.config.vocab_size == 128
    assert model.get_output_embeddings().weight.shape[0] == 128  # tied: both grew
    torch.testing.assert_close(model.get_input_embeddings().weight[100:], old.mean(0).expand(28, -1))
    torch.testing.assert_close(model.get_input_embeddings().weight[sink], old.mean(0))
    assert add_sink_token(model, tokenizer, "<|sink|>") == sink  # recorded sink: reused, not re-initialised
    with pytest.raises(SinkTokenError, match="pick a new text"):
        add_sink_token(tiny_model("llama", seed=0), char_tokenizer(), "a")  # an ordinary text token


def test_sink_prepended_once_per_chunk_and_pose_keeps_it_at_zero():
    docs = [list(range(3, 50)), list(range(50, 90))]
    rows = chunk_tokens(docs, 16, packing=False, sink_token_id=99)["input_ids"]
    assert rows.shape == (87 // 15, 16)
    assert (rows[:, 0] == 99).all() and not (rows[:, 1:] == 99).any()
    assert rows[:, 1:].reshape(-1).tolist() == [t for d in docs for t in d][: rows.shape[0] * 15]  # text intact

    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    order = SampleOrder(len(dataset), seed=0, shuffle=True)
    for first in range(3):
        batch = micro_batch(dataset, order, first, 0, 1, 2, pose_target=64, pose_seed=5, sink_first=True)
        assert (batch["input_ids"][:, 0] == 99).all() and (batch["input_ids"][:, 1:] != 99).all()
        positions = batch["position_ids"]
        assert (positions[:, 0] == 0).all() and (positions[:, 1:] >= 1).all() and (positions < 64).all()
        assert (positions.diff(dim=1) > 0).all()


def test_recipe_refusals():
    with pytest.raises(RecipeError, match="data.packing=false"):
        load_recipe(["model.sink_token=true", "data.packing=true"])
    with pytest.raises(RecipeError, match="pretrained or scratch"):
        load_recipe(["model.init=random"])


def test_build_dataset_rows_start_with_sink(assets, tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["<|sink|>"], special_tokens=True)
    args = DataArgs(source=str(assets["data"]), seq_len=32, cache_dir=str(tmp_path))
    rows = torch.tensor(build_dataset(args, tokenizer, sink_token_id=99)["input_ids"])
    assert (rows[:, 0] == 99).all() and (rows[:, 1:] != 99).all()
    plain = torch.tensor(build_dataset(args, tokenizer)["input_ids"])  # another cache key: no sink
    assert (plain != 99).all()


@pytest.fixture(scope="module")
def full_run(assets):
    return train(load_recipe(sink_overrides(assets, "full")))


def test_full_training_trains_the_row_and_checkpoint_records_id(full_run, assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(full_run.run_dir) / "checkpoints" / "step_000002" / "model"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["yarnkit_sink_token_id"] == 99
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(assets["model"]).get_input_embeddings().weight
    row = reloaded.get_input_embeddings().weight[99]
    assert not torch.allclose(row, start[1])  # started as BOS's row, moved by training
    assert AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids("<|sink|>") == 99


def test_lora_trains_the_sink_row_and_export_keeps_the_id(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from yarnkit.export.cli import export
    from yarnkit.runtime.engine import StreamingEngine

    from conftest import tiny_model

    base = tmp_path / "full-vocab"  # vocab 99 = the tokenizer's: the sink grows it to 100 (untied head too)
    tiny_model("llama", seed=0, bos_token_id=1, eos_token_id=2, vocab_size=99).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    result = train(load_recipe(sink_overrides(assets, "lora", **{"lora.enabled": True, "lora.r": 4,
                                                                 "model.name_or_path": base})))
    ckpt = Path(result.run_dir) / "checkpoints" / "step_000002" / "model"
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert any("trainable_tokens" in key for key in adapter), sorted(adapter)[:5]
    report = export(result.run_dir, tmp_path / "exported", merge_lora=True, dtype="float32")
    assert report["config_check"]["sink_token_id"] == 99 and any("resized" in note for note in report["notes"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert model.config.yarnkit_sink_token_id == 99
    assert AutoTokenizer.from_pretrained(tmp_path / "exported").convert_tokens_to_ids("<|sink|>") == 99
    base_weights = load_file(base / "model.safetensors")
    base_bos = base_weights["model.embed_tokens.weight"][1]
    assert not torch.allclose(model.get_input_embeddings().weight[99], base_bos)  # the row was trained
    torch.testing.assert_close(model.get_output_embeddings().weight[99], base_weights["lm_head.weight"].mean(0))
    engine = StreamingEngine(model, window=32)
    assert engine.options.sinks == 1
    engine.feed(torch.tensor([[5, 6, 7]]))
    assert engine.cache_ids[:2].tolist() == [99, 5]  # prepended once, in slot 0


def test_stream_eval_prepends_sink_once():
    from yarnkit.eval.stream import token_stream

    assert list(token_stream([("a", [5, 6]), ("b", [7])], bos=1, sink=99)) == [99, 1, 5, 6, 1, 7]
    assert list(token_stream([("a", [5])], bos=1)) == [1, 5]


def test_scratch_model_from_config(assets):
    recipe = load_recipe(sink_overrides(assets, "scratch", **{
        "model.init": "scratch", "model.scratch.layers": 1, "model.scratch.hidden": 32, "model.scratch.heads": 2,
        "model.scratch.kv_heads": 1, "model.scratch.intermediate": 64, "model.scratch.context": 128,
        "yarn.factor": 1.0, "train.max_steps": 1}))
    result = train(recipe)
    config = json.loads((Path(result.run_dir) / "checkpoints" / "step_000001" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 32 and config["head_dim"] == 16
    assert config["yarnkit_sink_token_id"] == 99 and config["max_position_embeddings"] == 128


def test_eval_stream_cli_uses_one_sink_and_prepends_it(full_run, assets, tmp_path):
    import argparse

    from yarnkit.eval import cli, tasks

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["stream", full_run.run_dir, "--data", str(assets["data"]), "--policy", "sink",
                              "--window", "32", "--max-tokens", "120", "--chunk", "8", "--out", str(tmp_path)])
    result = tasks.run_task(args)
    assert result["sink_token_id"] == 99 and result["sinks"] == 1 and result["policy"] == "sinks1+W32"  # --window counts the whole cache, the sink included
    assert result["tokens_processed"] == 120 and result["ppl"] > 1


def test_lora_trains_the_tied_sink_row_only_through_trainable_tokens():
    from conftest import tiny_model

    from yarnkit.train.model_setup import LoraArgs, add_lora

    model = tiny_model("llama", seed=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, vocab_size=99)
    sink = add_sink_token(model, char_tokenizer())
    before = model.get_input_embeddings().weight.detach().clone()
    peft_model = add_lora(model, LoraArgs(enabled=True, r=4), train_token_ids=[sink])
    extra = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(extra) == 1 and "trainable_tokens" in extra[0]  # not the whole embedding
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[sink] + list(range(3, 40))])
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = peft_model.merge_and_unload()
    weight, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.allclose(weight[sink], before[sink])  # trained
    torch.testing.assert_close(weight[:sink], before[:sink])  # other rows untouched
    assert weight.data_ptr() == head.data_ptr()  # still tied after the merge


@pytest.mark.parametrize("saved, asked", [(True, False), (False, True)])
def test_resuming_across_a_sink_token_change_is_refused(assets, saved, asked, capsys):
    from yarnkit.cli import main

    run = f"resume-{saved}"
    train(load_recipe(sink_overrides(assets, run, **{"model.sink_token": saved, "train.max_steps": 1})))
    items = sink_overrides(assets, run, **{"model.sink_token": asked, "resume": "auto"})
    with pytest.raises(RecipeError, match="model.init/sink_token"):
        train(load_recipe(items))
    capsys.readouterr()
    assert main(["train", *items]) == 2  # the CLI: one line naming the setting and the fix, no traceback
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "sink_token" in error[0] and "resume=none" in error[0]


def test_streaming_sinks_rule_and_the_zero_sink_warning():
    import warnings

    from transformers import LlamaConfig

    from yarnkit.sink_token import SinkTokenWarning, streaming_sinks

    plain, trained = LlamaConfig(), LlamaConfig(yarnkit_sink_token_id=7)
    assert streaming_sinks(plain) == 4 and streaming_sinks(trained) == 1
    assert streaming_sinks(trained, 2) == 2
    with pytest.warns(SinkTokenWarning, match="--sinks 0 lets it be evicted"):
        assert streaming_sinks(trained, 0) == 0  # allowed, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert streaming_sinks(plain, 0) == 0  # no sink token: nothing to warn about
