"""Two ``attention_reallocation`` blocks on one model exited out of order (outer before inner, issue #27 case 7): the
out-of-order exit is refused, the inner block keeps its exact effect until it exits, and then the model is plain."""

from __future__ import annotations

import pytest
import torch

from conftest import layout, random_tokens
from peft_mose import attention_reallocation


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_outer_block_exited_before_the_inner_one_is_refused_and_the_inner_one_stays_exact(llama):
    ids, modality_ids = random_tokens(), layout()
    plain = logits(llama, ids)
    with attention_reallocation(llama, modality_ids, tau=0.05):
        inner_alone = logits(llama, ids)
    assert not torch.allclose(inner_alone, plain)  # the inner block's effect is visible
    outer = attention_reallocation(llama, modality_ids, strategy="pai", alpha=2.0)
    inner = attention_reallocation(llama, modality_ids, tau=0.05)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="reverse order of entry"):
        outer.__exit__(None, None, None)
    torch.testing.assert_close(logits(llama, ids), inner_alone, rtol=0, atol=0)  # still the inner block's effect
    inner.__exit__(None, None, None)
    torch.testing.assert_close(logits(llama, ids), plain, rtol=0, atol=0)  # and then the model as before both
    assert llama.config._attn_implementation == "sdpa"
