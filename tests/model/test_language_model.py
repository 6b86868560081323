"""Next-token loss: predictions made from special tokens are dropped; pooled over blocks and batches."""

import math

import torch
import torch.nn.functional as F

from saex.model.language_model import next_token_loss


def test_loss_drops_predictions_from_special_tokens_and_pools(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    torch.manual_seed(0)
    blocks = torch.randint(3, len(tok), (3, 16))
    blocks[:, 0] = tok.bos_token_id
    blocks[1, 7] = tok.eos_token_id
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    losses, expected_n = [], 0
    for b in range(3):
        for t in range(15):
            if blocks[b, t] in (tok.bos_token_id, tok.eos_token_id):
                continue
            losses.append(F.cross_entropy(logits[b, t], blocks[b, t + 1]).item())
            expected_n += 1
    result = next_token_loss(model, blocks, tok, device=torch.device("cpu"), batch_blocks=2)
    assert result["n_predictions"] == expected_n == 3 * 14 - 1
    assert abs(result["ce"] - sum(losses) / len(losses)) < 1e-5
    assert abs(result["ppl"] - math.exp(result["ce"])) < 1e-9
    one_batch = next_token_loss(model, blocks, tok, device=torch.device("cpu"), batch_blocks=3)
    assert abs(one_batch["ce"] - result["ce"]) < 1e-6
