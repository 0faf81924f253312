"""The shared forward helpers agree with a plain full-logits computation."""

import torch

from stages.io.config import load_config
from stages.model.backbone import load_backbone
from stages.model.sequences import token_logprobs_and_entropy
from stages.model.tokenization import Tokenization


def test_trimmed_logprobs_match_full_computation() -> None:
    backbone = load_backbone(load_config().backbone)
    batch = Tokenization.of(backbone.tokenizer).batch(["3+4=", "12+19=", "1+1="], ["7", "31;2+2=4", "2"], "cpu", [True, False, True])
    logprobs, entropy = token_logprobs_and_entropy(backbone.model, batch)

    with torch.no_grad():
        full = torch.log_softmax(backbone.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    expected = torch.zeros_like(logprobs)
    expected_entropy = torch.zeros_like(entropy)
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[b, t]:
                expected[b, t] = full[b, t - 1, batch.input_ids[b, t]]
                expected_entropy[b, t] = -(full[b, t - 1].exp() * full[b, t - 1]).sum()
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-4)
    assert (logprobs[batch.response_mask == 0] == 0).all()
