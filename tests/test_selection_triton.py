"""The Triton selection kernel against the sort reference (interpreter on CPU, compiled on GPU)."""

import pytest
import torch

from specattn_runtime.selection import select_chunks
from specattn_runtime.selection.triton_select import indices_to_mask, topp_select_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,c", [(3, 5), (8, 63), (5, 300)])
@pytest.mark.parametrize("peaked", [False, True])
@pytest.mark.parametrize("keep_recent", [0, 1, 2])
@pytest.mark.parametrize("radix_bits", [1, 3, 4])  # 3 does not divide 31: the top pass has out-of-range digits
def test_kernel_matches_sort_reference(rows, c, peaked, keep_recent, radix_bits, gen):
    scores = torch.softmax(torch.randn(rows, c, generator=gen) * (6.0 if peaked else 1.0), -1)
    n_valid = torch.randint(max(keep_recent, 1), c + 1, (rows,), generator=gen)
    p = torch.rand(rows, generator=gen) * 0.6 + 0.4
    p[0] = 1.0  # dense row
    idx = torch.full((rows, c), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    count = torch.full((rows,), -7, dtype=torch.int32, device=DEVICE)
    topp_select_triton(scores.to(DEVICE), p, n_valid, keep_recent=keep_recent, out_idx=idx, out_count=count,
                       radix_bits=radix_bits)
    idx, count = idx.cpu(), count.cpu()
    assert (count >= 1).all() and (count <= n_valid).all()
    for r in range(rows):
        got = idx[r, : count[r]]
        assert (got[1:] > got[:-1]).all(), "indices must be increasing"
        assert (idx[r, count[r]:] == -7).all(), "slots past count must stay untouched"
    ref = select_chunks(scores, p, n_valid, method="sort", keep_recent=keep_recent)
    assert torch.equal(indices_to_mask(idx, count, c), ref)


def test_zero_rows_and_ties():
    scores = torch.tensor([[0.0] * 6, [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]])
    idx, count = topp_select_triton(scores.to(DEVICE), torch.tensor([0.9, 0.5]), torch.tensor([4, 6]))
    mask = indices_to_mask(idx.cpu(), count.cpu(), 6)
    assert mask[0].tolist() == [True] * 4 + [False] * 2  # no mass: dense within the window
    assert mask[1].all()  # the tie group at the threshold is kept whole
