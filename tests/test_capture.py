"""The recording attention must be transformers' attention plus a side channel: same logits, exact rows."""

import torch

from pipelines.attention_stats import query_positions
from specattn_runtime import capture
from specattn_runtime.models import load_causal_lm
from specattn_runtime.pooling import pool_to_chunks


def test_recorded_rows_equal_eager_attentions(quick_pair, gen):
    _, target = quick_pair
    ids = torch.randint(0, 49152, (2, 77), generator=gen)  # batch 2, ragged vs chunk 16
    eager = load_causal_lm(target, attn_implementation="eager")
    ours = load_causal_lm(target, attn_implementation=capture.register())
    pos = query_positions(77, 9)
    rec = capture.AttentionRecorder(pos, chunk_size=16, layers={0, 7, 29})
    with torch.no_grad():
        ref = eager(ids, output_attentions=True)
        out = ours(ids, specattn_recorder=rec)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert sorted(rec.rows) == [0, 7, 29]
    for layer in (0, 7, 29):
        expect = pool_to_chunks(ref.attentions[layer].float().mean(1)[:, pos], 16)  # [B, Q, C]
        torch.testing.assert_close(rec.rows[layer], expect, rtol=1e-5, atol=1e-6)
        assert torch.allclose(rec.rows[layer].sum(-1), torch.ones(2, len(pos)), atol=1e-5)
