"""`yarnkit eval` end to end on a tiny saved model: result JSON fields, plots, report, run-directory models.
Run: python -m pytest tests/test_eval_cli.py -q
"""

import argparse
import json
import shutil

import pytest
from conftest import tiny_model

from yarnkit.assets import sample_path
from yarnkit.cli import main

PPL_ROW_FIELDS = {"length", "ppl", "tail_ppl", "nll", "tokens", "tail_tokens", "windows", "documents",
                  "per_document", "too_short", "seconds"}
COMMON_FIELDS = {"task", "label", "model", "device", "dtype", "rope", "native_context", "max_position_embeddings",
                 "settings", "created", "plot"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from yarnkit.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", seed=11, vocab_size=49152).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


def run_eval(*argv):
    assert main(["eval", *map(str, argv)]) == 0


def load(path):
    return json.loads(path.read_text())


def test_ppl_passkey_needle_stream_write_documented_results_and_plots(model_dir, tmp_path):
    out = tmp_path / "out"
    run_eval("ppl", model_dir, "--data", sample_path("eval"), "--lengths", "64,128,1024", "--docs", "1",
             "--max-length", "512", "--out", out, "--label", "tiny base")
    ppl = load(out / "ppl-tiny_base.json")
    assert COMMON_FIELDS <= set(ppl) and ppl["task"] == "ppl" and ppl["native_context"] == 256
    assert set(ppl["rows"][0]) == PPL_ROW_FIELDS and ppl["rows"][1]["tokens"] == 127
    assert ppl["rows"][2]["skipped"] == "length 1024 > --max-length 512"
    run_eval("passkey", model_dir, "--lengths", "128", "--depths", "0,1", "--trials", "1", "--out", out)
    passkey = load(out / f"passkey-{model_dir.name}.json")
    assert COMMON_FIELDS | {"cells", "skipped", "accuracy"} <= set(passkey) and len(passkey["cells"]) == 2
    run_eval("needle", model_dir, "--lengths", "128", "--depths", "0.5", "--trials", "1", "--out", out)
    needle = load(out / f"needle-{model_dir.name}.json")
    assert needle["task"] == "needle" and len(needle["cells"]) == 1 and needle["cells"][0]["trials"][0]["key"] > 0
    books = tmp_path / "books"
    books.mkdir()
    (books / "a_empty.txt").write_text("\n")
    shutil.copy(sample_path("eval"), books / "b_book.txt.gz")
    run_eval("stream", model_dir, "--data", books, "--policy", "recompute", "--window", "32",
             "--max-tokens", "96", "--chunk", "8", "--segment", "32", "--out", out)
    stream = load(out / f"stream-{model_dir.name}_recompute_W32.json")
    assert COMMON_FIELDS | {"policy", "tokens_processed", "tokens_scored", "ppl", "stop_reason", "ms_per_token",
                            "peak_memory_bytes", "memory_kind", "segments", "skipped_documents"} <= set(stream)
    assert stream["tokens_processed"] == 96 and len(stream["segments"]) == 3
    assert stream["skipped_documents"] == [{"document": "a_empty.txt", "reason": "empty document"}]
    for result in (ppl, passkey, needle, stream):
        png = out / (result["plot"].rsplit("/", 1)[-1])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_and_markdown_report(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    for label in ("first", "second"):
        run_eval("ppl", model_dir, "--data", sample_path("eval"), "--lengths", "32,64", "--docs", "1",
                 "--out", out, "--label", label)
    run_eval("ppl", model_dir, "--data", sample_path("eval"), "--lengths", "32", "--docs", "1", "--out", out,
             "--label", "third", "--compare", out / "ppl-first.json", out / "ppl-second.json")
    assert (out / "ppl-third.png").is_file()
    run_eval("plot", out / "ppl-first.json", out / "ppl-second.json", "--out", out / "merged.png")
    assert (out / "merged.png").is_file()
    capsys.readouterr()
    run_eval("report", out / "ppl-first.json", out / "ppl-second.json", "--markdown", "--output", out / "t.md")
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| model | 32 | 64 |" and lines[2].startswith("| first | ") and len(lines) == 4
    first = load(out / "ppl-first.json")["rows"][0]
    assert f"{first['ppl']:.3g}" in lines[2] or f"{first['ppl']:.2f}" in lines[2]
    assert (out / "t.md").read_text().strip() == table.strip()


def test_rope_scaling_options_patch_the_loaded_model(model_dir, tmp_path):
    out = tmp_path / "out"
    nll = {}
    for name, extra in {"base": [], "dynamic": ["--rope-type", "dynamic", "--factor", "4"],
                        "yarn": ["--rope-type", "yarn", "--factor", "4"]}.items():
        run_eval("ppl", model_dir, "--data", sample_path("eval"), "--lengths", "128,512", "--docs", "1", "--out", out,
                 "--label", name, *extra)
        result = load(out / f"ppl-{name}.json")
        nll[name] = [row["nll"] for row in result["rows"]]
        if extra:
            assert result["rope"]["rope_type"] == name and result["rope"]["factor"] == 4.0
            assert result["native_context"] == 256
    assert nll["dynamic"][0] == pytest.approx(nll["base"][0], abs=1e-9)  # dynamic NTK is inactive inside 256
    assert nll["dynamic"][1] != pytest.approx(nll["base"][1], abs=1e-7)  # ... and active at 512
    assert nll["yarn"][0] != pytest.approx(nll["base"][0], abs=1e-7)  # static YaRN changes every length


def test_a_run_directory_evaluates_its_latest_checkpoint(model_dir, tmp_path):
    from yarnkit.eval.loading import load_for_eval

    for step in ("step_000100", "step_000200"):
        shutil.copytree(model_dir, tmp_path / "run" / "checkpoints" / step / "model")
        (tmp_path / "run" / "checkpoints" / step / "state").mkdir()
        (tmp_path / "run" / "checkpoints" / step / "state" / "trainer_state.json").write_text("{}")
    args = argparse.Namespace(model=str(tmp_path / "run"), device="cpu", dtype="float32", rope_type=None, label=None,
                              attention_factor=None)
    _, _, meta = load_for_eval(args)
    assert meta["model"].endswith("step_000200/model")


def test_bad_arguments_fail_clearly(model_dir, tmp_path, capsys):
    """One line each at the CLI boundary (tests/test_bad_input.py has the full table)."""
    for argv, named in ((["ppl", model_dir, "--data", sample_path("eval"), "--factor", "4"], "--rope-type and --factor"),
                        (["ppl", model_dir, "--data", tmp_path / "missing.txt"], "missing.txt"),
                        (["report", tmp_path / "nope.json"], "nope.json")):
        assert main(["eval", *map(str, argv), *(["--out", str(tmp_path)] if argv[0] != "report" else [])]) == 2
        assert named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_attention_factor_sweeps_the_yarn_temperature_of_a_scaled_model(model_dir, tmp_path):
    """`--attention-factor` re-applies the model's own YaRN with another temperature: the result records it and the
    perplexity moves; a model without YaRN is refused with the fix."""
    from yarnkit.models import load_model
    from yarnkit.patch import apply_rope_scaling

    scaled = tmp_path / "yarn"
    model, tokenizer = load_model(str(model_dir))
    apply_rope_scaling(model, "yarn", factor=4)
    model.save_pretrained(scaled)
    tokenizer.save_pretrained(scaled)
    out = tmp_path / "out"
    common = ["--data", sample_path("eval"), "--lengths", "512", "--docs", "1", "--out", out]
    run_eval("ppl", scaled, *common, "--label", "own")
    run_eval("ppl", scaled, *common, "--attention-factor", "1.6", "--label", "hot")
    own, hot = load(out / "ppl-own.json"), load(out / "ppl-hot.json")
    assert own["rope"]["factor"] == 4 and hot["rope"]["attention_factor"] == 1.6
    assert hot["rope"]["rope_parameters"]["factor"] == 4 and hot["rope"]["original_max_position_embeddings"] == 256
    assert abs(hot["rows"][0]["ppl"] - own["rows"][0]["ppl"]) > 1e-6 * own["rows"][0]["ppl"]  # a random model: small
    assert main(["eval", "ppl", str(model_dir), *map(str, common), "--attention-factor", "1.2"]) == 2
