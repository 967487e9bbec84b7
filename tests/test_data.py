"""Data: BOS/EOS joining and fixed-length chunks, packing positions, the on-disk cache, sources, errors, order, PoSE.

Run: python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer_helpers import char_tokenizer
from yarnkit.train.data import (DataArgs, SampleOrder, build_dataset, cache_key, chunk_tokens, encode_documents,
                                micro_batch)
from yarnkit.errors import DataError
from yarnkit.train.pose import pose_generator, pose_position_ids


def reference_chunks(docs, seq_len):
    """Plain-Python reference: concatenate, cut, drop the remainder; positions restart per document and block."""
    flat, positions = [], []
    for doc in docs:
        flat += doc
        positions += list(range(len(doc)))
    blocks, block_positions = [], []
    for start in range(0, len(flat) - seq_len + 1, seq_len):
        blocks.append(flat[start:start + seq_len])
        run, pos = 0, []
        for i in range(seq_len):
            run = 0 if (positions[start + i] == 0 or i == 0) else run + 1
            pos.append(run)
        block_positions.append(pos)
    return blocks, block_positions


def test_chunks_match_reference_with_and_without_packing():
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 35, 2], [1, 40, 2]]
    blocks, positions = reference_chunks(docs, 6)
    out = {key: value.tolist() for key, value in chunk_tokens(docs, 6, packing=True).items()}
    assert out["input_ids"] == blocks and out["position_ids"] == positions
    assert out["position_ids"][1] == [0, 1, 2, 0, 1, 2]  # starts mid-document 2 (reset), then document 3 starts
    assert "position_ids" not in chunk_tokens(docs, 6, packing=False)


def write_docs(path, texts):
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return path


def test_jsonl_source_bookends_and_cache(tmp_path):
    tok = char_tokenizer()
    source = write_docs(tmp_path / "docs.jsonl", ["abcdefg", "hijkl"])
    args = DataArgs(source=str(source), text_field="body", seq_len=4, cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(args, tok)
    expected = [tok.bos_token_id] + tok("abcdefg", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] \
        + [tok.bos_token_id] + tok("hijkl", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for row in ds["input_ids"] for t in row] == expected[:16] and len(ds) == 4
    cached = list((tmp_path / "cache").iterdir())
    assert [p.name for p in cached] == [cache_key(args, tok)]
    build_dataset(args, tok)
    assert list((tmp_path / "cache").iterdir()) == cached  # second build reads the cache
    args.seq_len = 5
    assert cache_key(args, tok) != cached[0].name


def test_fast_encoding_gives_the_tokenizers_own_ids(tokenizer):
    """The data path asks the tokenizer without character offsets; the ids must be those of a plain call (the
    reference), on prose, code, digits, Unicode and text that looks like special tokens."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    texts = [read_text(sample_path("train"))[:200_000], read_text(__file__), "1234567 and 3.14159",
             "naïve café — “quotes” 日本語 🙂", "<|im_start|>user\nhi<|im_end|>", "", "  two  spaces\n\n\nnewlines"]
    assert encode_documents(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_two_runs_building_one_cache_key_at_once_both_succeed(tmp_path, monkeypatch):
    """Two launches sharing a cache (a reference run beside a resumed one) may both miss the cache and tokenize;
    the second rename then meets the first's finished folder and must use it, not fail."""
    import shutil

    import yarnkit.train.data as data

    tok = char_tokenizer()
    source = write_docs(tmp_path / "docs.jsonl", ["abcdefg", "hijkl"])
    args = DataArgs(source=str(source), text_field="body", seq_len=4, cache_dir=str(tmp_path / "cache"))
    first = build_dataset(args, tok)["input_ids"]
    target = tmp_path / "cache" / cache_key(args, tok)
    shutil.move(target, tmp_path / "other")
    tokenize = data._tokenize

    def other_run_finishes_meanwhile(*a, **kw):
        shutil.copytree(tmp_path / "other", target)  # after this run's cache check, before its rename
        return tokenize(*a, **kw)

    monkeypatch.setattr(data, "_tokenize", other_run_finishes_meanwhile)
    assert build_dataset(args, tok)["input_ids"] == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]  # its temp dir is gone


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one two three four", "five six"]}), tmp_path / "d.parquet")
    ds = build_dataset(DataArgs(source=str(tmp_path / "d.parquet"), seq_len=8, cache_dir=str(tmp_path / "c")),
                       char_tokenizer())
    assert len(ds) == (18 + 2 + 8 + 2) // 8 and all(len(row) == 8 for row in ds["input_ids"])


def test_glob_source_reads_only_matching_files(tmp_path):
    (tmp_path / "train_a.txt").write_text("abcdefgh")
    (tmp_path / "train_b.txt").write_text("ijklmnop")
    (tmp_path / "test_c.txt").write_text("SHOULD NOT APPEAR")
    tok = char_tokenizer()
    ds = build_dataset(DataArgs(source=str(tmp_path / "train_*.txt"), seq_len=5, cache_dir=str(tmp_path / "c")), tok)
    tokens = tok.convert_ids_to_tokens([t for row in ds["input_ids"] for t in row])
    assert "".join(tokens) == "<s>abcdefgh</s><s>ijklmnop</s>" and len(ds) == 4  # 20 tokens, sorted files
    with pytest.raises(FileNotFoundError, match="no files match"):
        build_dataset(DataArgs(source=str(tmp_path / "nope_*.txt"), cache_dir=str(tmp_path / "c")), tok)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        build_dataset(DataArgs(source=str(tmp_path / "nowhere.txt"), cache_dir=str(tmp_path)), char_tokenizer())


def test_data_shorter_than_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("tiny text")
    with pytest.raises(DataError, match=r"has 11 tokens, fewer than one sequence of data.seq_len=64"):
        build_dataset(DataArgs(source=str(tmp_path / "short.txt"), seq_len=64, cache_dir=str(tmp_path / "c")),
                      char_tokenizer())
    assert not list((tmp_path / "c").iterdir())  # the failed build left no cache entry


def test_sample_order_is_seeded_per_epoch_and_ranks_are_disjoint():
    order = SampleOrder(10, seed=3, shuffle=True)
    epoch0, epoch1 = [order[k] for k in range(10)], [order[k] for k in range(10, 20)]
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1) and epoch0 != epoch1
    assert [SampleOrder(10, seed=3, shuffle=True)[k] for k in range(20)] == epoch0 + epoch1  # resumable
    dataset = {"input_ids": list(range(10))}

    class Rows:
        def __getitem__(self, index):
            return {"input_ids": [[dataset["input_ids"][i]] for i in index]}

    rank0 = micro_batch(Rows(), order, 4, rank=0, world=2, size=3)
    rank1 = micro_batch(Rows(), order, 4, rank=1, world=2, size=3)
    assert rank0["samples"] == [4, 6, 8] and rank1["samples"] == [5, 7, 9]
    assert rank0["input_ids"][:, 0].tolist() == [order[k] for k in (4, 6, 8)]


@pytest.mark.parametrize("seq_len, target", [(16, 64), (2, 3), (100, 100), (512, 16384)])
def test_pose_positions_stay_below_target_and_increase(seq_len, target):
    spans = []
    for sample in range(200):
        pos = pose_position_ids(seq_len, target, pose_generator(0, sample))
        assert pos.shape == (seq_len,) and int(pos.min()) >= 0 and int(pos.max()) < target
        assert bool((pos[1:] > pos[:-1]).all())
        spans.append(int(pos.max()))
    if target > seq_len:
        assert max(spans) >= seq_len  # positions really reach past the chunk length
    assert torch.equal(pose_position_ids(seq_len, target, pose_generator(0, 5)),
                       pose_position_ids(seq_len, target, pose_generator(0, 5)))


def test_pose_rejects_short_target():
    with pytest.raises(ValueError, match="shorter than seq_len"):
        pose_position_ids(64, 32, pose_generator(0, 0))
