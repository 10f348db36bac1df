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
    assert_same_up_to_rounding(indices_to_mask(idx, count, c), ref, scores, p, n_valid, keep_recent)


def assert_same_up_to_rounding(got, ref, scores, p, n_valid, keep_recent, rel=1e-5):
    """``got`` equals the float64 reference, or, on rows where the two differ, ``got`` is still a top-p set up to
    float32 rounding of the mass: it takes free chunks in score order, reaches the target within ``rel``, and its
    smallest free chunk is needed within ``rel``. (A float32 sum and a float64 sum may fall on either side of
    ``p * total`` when the boundary chunk is that close; exact equality then flakes on random inputs.)"""
    from specattn_runtime.selection.common import valid_and_forced

    valid, forced = valid_and_forced(n_valid, scores.shape[1], True, keep_recent)
    for r in torch.nonzero((got != ref).any(-1)).flatten().tolist():
        s = scores[r].double()
        total, target = s[valid[r]].sum(), float(p[r]) * s[valid[r]].sum()
        assert not (got[r] & ~valid[r]).any() and (got[r] | ~forced[r]).all(), f"row {r}: invalid or forced chunk"
        free_got, free_left = got[r] & ~forced[r], valid[r] & ~forced[r] & ~got[r]
        if free_got.any() and free_left.any():
            assert s[free_got].min() >= s[free_left].max(), f"row {r}: not in score order"
        mass = s[got[r]].sum()
        assert mass >= target - rel * total, f"row {r}: mass {mass} short of {target}"
        if free_got.any():
            assert mass - s[free_got].min() < target + rel * total, f"row {r}: more chunks than needed"


def test_zero_rows_and_ties():
    scores = torch.tensor([[0.0] * 6, [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]])
    idx, count = topp_select_triton(scores.to(DEVICE), torch.tensor([0.9, 0.5]), torch.tensor([4, 6]))
    mask = indices_to_mask(idx.cpu(), count.cpu(), 6)
    assert mask[0].tolist() == [True] * 4 + [False] * 2  # no mass: dense within the window
    assert mask[1].all()  # the tie group at the threshold is kept whole


@pytest.mark.parametrize("radix_bits", [1, 2])
def test_neighbouring_float_patterns(radix_bits, gen):
    """Scores a few ulps apart: the search must resolve the threshold down to its last bit."""
    n = 40
    row = torch.ones(n)
    for i in range(1, n):
        row[i] = torch.nextafter(row[i - 1], torch.tensor(2.0))
    scores = row[torch.randperm(n, generator=gen)][None].repeat(6, 1)
    scores[3:, ::3] = 1.0  # plus exact ties in rows 3-5
    p = (torch.randint(3, n - 3, (6,), generator=gen) + 0.5) / n  # targets half a chunk from any boundary
    idx, count = topp_select_triton(scores.to(DEVICE), p, torch.full((6,), n), radix_bits=radix_bits)
    got = indices_to_mask(idx.cpu(), count.cpu(), n)
    ref = select_chunks(scores, p, method="sort")
    assert torch.equal(got[:3], ref[:3])
    # with ties the reference (a stable sort) cuts inside the tie group; the kernel keeps the group whole
    cut = torch.where(ref, scores, float("inf"))[:, 1:-1].min(-1).values  # smallest selected free score
    assert torch.equal(got, ref | (scores == cut[:, None]))


@pytest.mark.parametrize("radix_bits,num_warps", [(2, 1), (5, 2)])
def test_launch_settings_do_not_change_the_result(radix_bits, num_warps, gen):
    scores = torch.softmax(torch.randn(7, 900, generator=gen) * 2.0, -1)
    p = torch.rand(7, generator=gen) * 0.5 + 0.45
    n_valid = torch.randint(2, 901, (7,), generator=gen)
    ref_idx, ref_count = topp_select_triton(scores.to(DEVICE), p, n_valid)
    idx, count = topp_select_triton(scores.to(DEVICE), p, n_valid, radix_bits=radix_bits, num_warps=num_warps)
    assert torch.equal(indices_to_mask(idx.cpu(), count.cpu(), 900),
                       indices_to_mask(ref_idx.cpu(), ref_count.cpu(), 900))
    with pytest.raises(ValueError, match="radix_bits"):
        topp_select_triton(scores.to(DEVICE), p, n_valid, radix_bits=9)


@pytest.mark.parametrize("c", [40, 513])
def test_recent_start_from_device_memory(c, gen):
    """The engine's form: chunks from ``recent_start[r]`` on are always kept, the index read on the device."""
    rows = 6
    scores = torch.softmax(torch.randn(rows, c, generator=gen) * 3.0, -1)
    n_valid = torch.randint(2, c + 1, (rows,), generator=gen)
    recent_start = (n_valid - torch.randint(1, 3, (rows,), generator=gen)).clamp_min(1).int()
    p = torch.rand(rows, generator=gen) * 0.5 + 0.45
    idx, count = topp_select_triton(scores.to(DEVICE), p, n_valid, recent_start=recent_start.to(DEVICE))
    got = indices_to_mask(idx.cpu(), count.cpu(), c)
    from specattn_runtime.selection.reference import topp_mask_reference
    from specattn_runtime.selection.threshold import topp_mask_threshold

    ref = topp_mask_reference(scores, p, n_valid, recent_start=recent_start)
    assert_same_up_to_rounding(got, ref, scores, p, n_valid, 0)
    rows_ = torch.arange(c)[None, :]
    assert (got[(rows_ >= recent_start[:, None]) & (rows_ < n_valid[:, None])]).all()
    assert_same_up_to_rounding(topp_mask_threshold(scores, p, n_valid, recent_start=recent_start), got, scores, p,
                               n_valid, 0)
