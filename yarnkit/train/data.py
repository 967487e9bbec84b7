"""Training data: documents -> tokens (BOS text EOS) -> fixed `seq_len` chunks, cached on disk, served in a
deterministic, resumable order.

Sources (`data.source`): `bundled:train` (the novel shipped in yarnkit.assets), a .txt/.gz file, a folder of
them or a glob (`/data/books/train_*.txt.gz`), a .jsonl file (`data.text_field`), a .parquet file, `python-stdlib`
(this interpreter's standard-library .py sources, tests and site-packages left out: an offline code corpus), or
`hf:NAME` (a `datasets` dataset from the local cache; a dataset that already has `input_ids`, like the YaRN
paper's pre-tokenized PG-19, is used as tokens). Local sources can be joined with commas (`books/,python-stdlib`).
Documents are joined with BOS/EOS bookends and cut into `seq_len` blocks, dropping each map batch's remainder
(the paper's tokenization). `packing=true` adds `position_ids` that restart at every document inside a block. With a dedicated sink token
(`model.sink_token`, see yarnkit/sink_token.py) blocks hold `seq_len - 1` text tokens after the sink at position 0.
The chunked dataset is written once with `datasets` under `$YARNKIT_CACHE/data/<key>`, the key covering the
tokenizer, the source files (path, size, mtime), seq_len and packing; writes are atomic (temp dir + rename).

`SampleOrder` maps the k-th sample of the global stream to a chunk (a fresh seeded permutation per epoch);
ranks take interleaved slices, so the data position is one integer (samples consumed) saved in checkpoints.

A data mix (`data.mix`, weights over `MIX_SOURCES`) draws the source of sample k from a generator seeded by
(data.seed, k): `books` is the chunk of `data.source` as above, `code` a chunk of `data.code_source` (by default
the standard library, whose sorted files put a package's modules, which import each other, side by side),
`retrieval` and `chat` a synthetic retrieval row (yarnkit/train/synthetic.py) built on the sample's book chunk,
plain or in the chat template. With `data.long_share`, that share of micro-batches (drawn per micro-batch from
the seed) is one contiguous row of `micro_batch_size x seq_len` tokens instead: consecutive chunks of one source
(the same book, the same package) with true positions, no PoSE; the tokens per step stay the same. All of it is a
function of the sample number, so a resumed run sees the same rows.
Tested by `python -m pytest tests/test_data.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yarnkit.corpus import PYTHON_STDLIB, expand_alias, local_documents, local_files, local_paths, source_parts
from yarnkit.errors import DataError
from yarnkit.model_files import cache_dir, rename_into_place
from yarnkit.train.pose import FAR_MIN, far_position_ids, pose_generator, pose_position_ids
from yarnkit.train.synthetic import Row, RowMaker, SyntheticArgs, training_phrasings

MAP_BATCH = 1000  # documents per tokenization/chunking batch; each batch drops < seq_len trailing tokens
MIX_SOURCES = ("books", "code", "retrieval", "chat")


@dataclass
class DataArgs:
    source: str = "bundled:train"  # bundled:train | file | folder | glob | .jsonl | .parquet | hf:NAME
    text_field: str = "text"
    split: str = "train"  # for hf: sources
    seq_len: int = 1024
    packing: bool = False  # position_ids restart per document (sdpa then masks across documents: O(seq^2) mask)
    shuffle: bool = True
    seed: int = 42
    cache_dir: str = ""  # "" = $YARNKIT_CACHE/data
    num_proc: int = 1  # processes for tokenization
    mix: dict[str, float] = field(default_factory=dict)  # {} = `source` alone; else weights of MIX_SOURCES
    code_source: str = PYTHON_STDLIB  # the `code` part of a mix
    long_share: float = 0.0  # share of micro-batches given as one contiguous micro_batch_size x seq_len row
    synthetic: SyntheticArgs = field(default_factory=SyntheticArgs)  # the `retrieval` and `chat` rows


def check_mix(args: DataArgs) -> None:
    """A mix names known sources with weights >= 0 (not all 0), and its synthetic templates stay train-only."""
    unknown = sorted(set(args.mix) - set(MIX_SOURCES))
    if unknown:
        raise DataError(f"data.mix has unknown source(s) {unknown}; choose from {', '.join(MIX_SOURCES)}")
    if args.mix and (min(args.mix.values()) < 0 or sum(args.mix.values()) <= 0):
        raise DataError(f"data.mix weights must be >= 0 and not all 0, got {dict(args.mix)}")
    if not 0.0 <= args.long_share <= 1.0:
        raise DataError(f"data.long_share={args.long_share} is outside [0, 1]; it is the share of long micro-batches")
    if (args.long_share or args.mix) and args.packing:
        raise DataError("data.mix / data.long_share cannot be combined with data.packing; set data.packing=false")
    if args.synthetic.questions < 1 or args.synthetic.facts < 1:
        raise DataError("data.synthetic.facts and data.synthetic.questions must be >= 1")
    synthetic = args.synthetic
    for name in ("interleave", "multi", "chains", "far", "lookalike", "preview", "restate", "numbers"):
        if not 0.0 <= getattr(synthetic, name) <= 1.0:
            raise DataError(f"data.synthetic.{name}={getattr(synthetic, name)} is outside [0, 1]; it is a share of "
                            "the synthetic rows")
    if args.mix.get("retrieval") or args.mix.get("chat") or synthetic.templates or synthetic.attributes:
        training_phrasings(synthetic)  # a template that collides with an evaluation one fails here


def _raw_dataset(args: DataArgs, workdir: str):
    """A `datasets.Dataset` with a `text` column, or an `input_ids` column for pre-tokenized sources."""
    import datasets

    source = expand_alias(args.source)
    if source.startswith("hf:"):
        ds = datasets.load_dataset(source[3:], split=args.split)
    else:
        parts = source_parts(args.source)
        paths = [p for part in parts if part != PYTHON_STDLIB for p in local_paths(expand_alias(part))]
        parquet = [str(f) for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*.parquet")))
                   if f.suffix == ".parquet"]
        if not parquet:
            docs = [text for part in parts for text in local_documents(part, args.text_field) if text.strip()]
            if not docs:
                raise DataError(f"data.source={args.source} holds no text (every document is empty)",
                                "point data.source at files with text in them")
            return datasets.Dataset.from_dict({"text": docs})
        if len(parts) > 1:
            raise DataError(f"data.source={args.source}: parquet files cannot be joined with other sources; "
                            "use one parquet source")
        ds = datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=workdir)
    if "input_ids" in ds.column_names:
        return ds.select_columns(["input_ids"])
    if args.text_field not in ds.column_names:
        raise DataError(f"{args.source} has no column {args.text_field!r} (columns: {ds.column_names})",
                        "set data.text_field to the column holding the text")
    return ds.select_columns([args.text_field]).rename_column(args.text_field, "text") \
        if args.text_field != "text" else ds.select_columns(["text"])


def source_fingerprint(args: DataArgs) -> list:
    source = expand_alias(args.source)
    if source.startswith("hf:"):
        return [source, args.split]
    files = [f for part in source_parts(args.source) for f in local_files(part)]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] + [args.text_field]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{body}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode()).hexdigest()


def cache_key(args: DataArgs, tokenizer, sink_token_id: int | None = None) -> str:
    parts = [source_fingerprint(args), tokenizer_fingerprint(tokenizer), args.seq_len, args.packing]
    key = json.dumps(parts + ([sink_token_id] if sink_token_id is not None else []))
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def chunk_tokens(docs: list[list[int]], seq_len: int, packing: bool, sink_token_id: int | None = None) -> dict:
    """Join token lists and cut them into `seq_len` blocks (remainder dropped); with `packing`, also per-document
    position ids that restart at each document start inside a block. With `sink_token_id`, each block is the
    sink followed by `seq_len - 1` text tokens (packing is refused: the sink belongs at position 0 only)."""
    flat = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in docs]) if docs else np.zeros(0, np.int64)
    if sink_token_id is not None:
        if packing:
            raise DataError("a sink token cannot be combined with data.packing; set data.packing=false")
        n = len(flat) // (seq_len - 1)
        text = flat[: n * (seq_len - 1)].reshape(n, seq_len - 1)
        return {"input_ids": np.concatenate([np.full((n, 1), sink_token_id, dtype=np.int64), text], axis=1)}
    n = len(flat) // seq_len
    out = {"input_ids": flat[: n * seq_len].reshape(n, seq_len)}
    if packing:
        starts = np.zeros(len(flat), dtype=bool)
        starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
        starts[np.arange(0, len(flat), seq_len)] = True  # a block also starts a position run
        index = np.arange(len(flat))
        run_start = np.maximum.accumulate(np.where(starts, index, 0))
        out["position_ids"] = (index - run_start)[: n * seq_len].reshape(n, seq_len)
    return out


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, no special tokens: `tokenizer(texts, add_special_tokens=False)["input_ids"]`. A fast
    tokenizer is asked through `encode_batch_fast` (tokenizers >= 0.20), which skips the character offsets that
    nothing here reads: the same ids in about half the time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _tokenize(ds, tokenizer, args: DataArgs):
    if "input_ids" in ds.column_names:
        return ds
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(batch):
        ids = encode_documents(tokenizer, batch["text"])
        return {"input_ids": [([bos] if bos is not None else []) + x + ([eos] if eos is not None else [])
                              for x in ids]}

    return ds.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=["text"],
                  num_proc=args.num_proc if args.num_proc > 1 else None, desc="tokenizing")


def build_dataset(args: DataArgs, tokenizer, sink_token_id: int | None = None, arrays: bool = False):
    """The chunked dataset (columns `input_ids`, and `position_ids` with packing), built once then cached.
    With `sink_token_id`, every row starts with that token (see `chunk_tokens`). With a mix or long rows, a
    `MixedData` over the chunks of each source instead. `arrays`: rows are read as numpy arrays, not lists (the
    training loop's fast path), for a plain dataset and for each source of a mix alike."""
    def chunks(chunk_args: DataArgs, sink: int | None = None):
        dataset = _chunks(chunk_args, tokenizer, sink)
        return dataset.with_format("numpy") if arrays else dataset

    if not args.mix and not args.long_share:
        return chunks(args, sink_token_id)
    check_mix(args)
    if sink_token_id is not None:
        raise DataError("data.mix / data.long_share cannot be combined with model.sink_token; turn one off")
    weights = dict(args.mix) or {"books": 1.0}
    books = chunks(args)
    code = chunks(DataArgs(source=args.code_source, seq_len=args.seq_len, cache_dir=args.cache_dir,
                           num_proc=args.num_proc)) if weights.get("code") else None
    maker = RowMaker(tokenizer, args.synthetic) if weights.get("retrieval") or weights.get("chat") else None
    return MixedData(args, weights, books, code, maker)


def _chunks(args: DataArgs, tokenizer, sink_token_id: int | None = None):
    import datasets

    root = Path(args.cache_dir) if args.cache_dir else cache_dir() / "data"
    target = root / cache_key(args, tokenizer, sink_token_id)
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    root.mkdir(parents=True, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root)
    try:
        tokens = _tokenize(_raw_dataset(args, workdir), tokenizer, args)
        chunks = tokens.map(lambda b: chunk_tokens(b["input_ids"], args.seq_len, args.packing, sink_token_id),
                            batched=True,
                            batch_size=MAP_BATCH, remove_columns=tokens.column_names, desc="chunking")
        if len(chunks) == 0:
            total = sum(len(x) for x in tokens["input_ids"])
            raise DataError(f"data {args.source} has {total} tokens, fewer than one sequence of "
                             f"data.seq_len={args.seq_len}; lower data.seq_len or add documents")
        chunks.save_to_disk(os.path.join(workdir, "final"))
        rename_into_place(Path(workdir) / "final", target, marker="dataset_info.json")  # runs may share a cache
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return datasets.load_from_disk(str(target))


class SampleOrder:
    """Sample k of the global stream -> chunk index. Epoch e = k // n uses permutation seeded by (seed, e)."""

    def __init__(self, num_chunks: int, seed: int, shuffle: bool):
        self.num_chunks, self.seed, self.shuffle = num_chunks, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, k: int) -> int:
        epoch, offset = divmod(k, self.num_chunks)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_chunks, generator=generator).tolist()
        return self._perm[offset]


class MixedData:
    """The chunks of each source of a mix; `len()` is the number of book chunks (what `SampleOrder` permutes)."""

    def __init__(self, args: DataArgs, weights: dict, books, code, maker: RowMaker | None):
        self.args, self.books, self.code, self.maker = args, books, code, maker
        self.names, self.weights = list(weights), list(weights.values())

    def __len__(self) -> int:
        return len(self.books)

    def source(self, k: int) -> str:
        return random.Random(f"{self.args.seed}:source:{k}").choices(self.names, self.weights)[0]

    def is_long(self, first_sample: int) -> bool:
        return random.Random(f"{self.args.seed}:long:{first_sample}").random() < self.args.long_share

    def row(self, k: int, order: SampleOrder, chunks: int) -> Row:
        """Sample k as `chunks` consecutive chunks of its source (a synthetic row built on book chunks)."""
        source = self.source(k)
        # code chunks are spread by a fixed prime stride (their own order); book chunks follow `order`
        table, first = (self.code, k * 7919) if source == "code" else (self.books, order[k])
        ids = table[[(first + i) % len(table) for i in range(chunks)]]["input_ids"]
        tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
        if source in ("retrieval", "chat"):
            rng = random.Random(f"{self.args.seed}:row:{k}")
            return self.maker.make(tokens, rng, len(tokens), chat=source == "chat")
        return Row.plain(tokens)


def answer_positions(answer_mask: torch.Tensor) -> torch.Tensor | None:
    """The flat indices, into the [B, S - 1] next-token targets, of the tokens where `answer_mask` [B, S] is True
    (token t is predicted at position t - 1); None when none is. Computed on the host, before the batch moves, so
    the loss needs no device sync to find them."""
    positions = answer_mask[:, 1:].reshape(-1).nonzero().squeeze(1)
    return positions if positions.numel() else None


def micro_batch(dataset, order: SampleOrder, first_sample: int, rank: int, world: int, size: int,
                pose_target: int = 0, pose_seed: int = 0, sink_first: bool = False,
                far_min: float = FAR_MIN) -> dict:
    """Rank `rank`'s `size` samples starting at global sample `first_sample` (ranks interleave).

    Returns `input_ids` [size, seq_len] (a mix's long micro-batch: [1, size x seq_len]), `position_ids` and
    `attention_mask` (or None), `answer_positions` (a mix's synthetic answer tokens, `answer_positions`)
    and `samples` (global sample numbers). With `sink_first` (rows start with a sink token), PoSE keeps the sink
    at position 0 and skips positions only among the text tokens after it. A far row (`Row.far_split`) gets its
    skip at its split (`pose.far_position_ids`, drawn from `far_min` of the room up) instead of PoSE's random one.
    PoSE batches carry an all-ones attention mask: without one, transformers reads a jump in position ids as the
    start of a packed document and would block attention across the skip."""
    samples = [first_sample + i * world + rank for i in range(size)]
    batch = {"samples": samples, "position_ids": None, "attention_mask": None, "answer_positions": None}
    splits = [0] * size
    if isinstance(dataset, MixedData):
        long = dataset.is_long(first_sample)  # one true long row: positions 0..L-1, no PoSE
        rows = [dataset.row(samples[0], order, size)] if long else [dataset.row(k, order, 1) for k in samples]
        batch["input_ids"] = torch.from_numpy(np.stack([row.ids for row in rows]))
        batch["answer_positions"] = answer_positions(torch.from_numpy(np.stack([row.answers for row in rows])))
        if long:
            return batch
        splits = [row.far_split for row in rows]
    else:
        rows = dataset[[order[k] for k in samples]]
        batch["input_ids"] = torch.tensor(rows["input_ids"], dtype=torch.long)
        if "position_ids" in rows:
            batch["position_ids"] = torch.tensor(rows["position_ids"], dtype=torch.long)
    if pose_target:
        seq_len = batch["input_ids"].shape[1]
        fixed = 1 if sink_first else 0  # the sink stays at position 0; PoSE spreads the rest over 1..target-1
        batch["position_ids"] = torch.stack([
            far_position_ids(seq_len, split, pose_target, pose_generator(pose_seed, k), far_min) if split else
            torch.cat((torch.arange(fixed), fixed + pose_position_ids(seq_len - fixed, pose_target - fixed,
                                                                       pose_generator(pose_seed, k))))
            for k, split in zip(samples, splits)])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch
