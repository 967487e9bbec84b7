"""Protocols on the real SmolLM2-135M at short lengths (slow: loads the model).
Run: python -m pytest tests/test_eval_smollm2.py -q
"""

import pytest

from yarnkit.assets import sample_path
from yarnkit.eval.documents import iter_eval_documents, tokenize_documents
from yarnkit.eval.passkey import evaluate_passkey
from yarnkit.eval.ppl import bos_token_id, evaluate_perplexity


@pytest.mark.slow
def test_real_model_ppl_falls_with_context_and_finds_a_1k_passkey(smollm2):
    model, tokenizer = smollm2
    documents, _ = tokenize_documents(iter_eval_documents(str(sample_path("eval"))), tokenizer, max_tokens=1023)
    bos = bos_token_id(tokenizer)
    # the same 1023 tokens of a book, scored with a context of up to 1024, 512 (stride 256) and 128 (stride 64)
    # tokens; measured on CPU fp32: 16.10, 16.28, 19.31 (more context helps inside the native window)
    whole, = evaluate_perplexity(model, documents, [1024], bos, num_docs=1)
    half, = evaluate_perplexity(model, documents, [512], bos, num_docs=1, stride=256)
    eighth, = evaluate_perplexity(model, documents, [128], bos, num_docs=1, stride=64)
    assert whole["tokens"] == half["tokens"] == eighth["tokens"] == 1023
    assert 5 < whole["ppl"] < half["ppl"] < eighth["ppl"] < 40
    result = evaluate_passkey(model, tokenizer, [1024], [0.0], trials=1, seed=0)
    trial = result["cells"][0]["trials"][0]
    assert trial["correct"], trial  # measured: key 25248 answered " 25248.\nThe grass"
