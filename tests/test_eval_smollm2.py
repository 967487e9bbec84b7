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
    documents, _ = tokenize_documents(iter_eval_documents(str(sample_path("eval"))), tokenizer, max_tokens=1024)
    short, longer = evaluate_perplexity(model, documents, [512, 1024], bos_token_id(tokenizer), num_docs=1)
    # measured on CPU fp32: 15.3 at 512, 14.4 at 1024 (a book; more context helps inside the native window)
    assert 5 < longer["ppl"] < short["ppl"] < 40
    result = evaluate_passkey(model, tokenizer, [1024], [0.0], trials=1, seed=0)
    trial = result["cells"][0]["trials"][0]
    assert trial["correct"], trial  # measured: key 25248 answered " 25248.\nThe grass"
