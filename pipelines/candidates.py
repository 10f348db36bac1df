"""Which layers may read sparsely: the first ``dense_layers`` stay dense, and so do sliding-window layers whose window
is shorter than ``min_sparse_window`` tokens.

Why windows count (the rule this project chose for Gemma 2 / 3, GPT-OSS, Mistral, Qwen2 with window layers):

- A window layer reads at most ``W`` keys per query whatever the context. At the long contexts where SpecAttn pays
  off its dense read is small beside a full layer's (Gemma 3's 1,024-token window at 32K: 3% of a global layer's
  read), so selection inside it could save at most that share times ``1 - density``;
- while a sparse layer pays per step whatever ``W`` is: a selection row over the whole context's chunks, its draft
  layer's recording, the chunk-list kernel, and the recall it gives up;
- and inside a short window there is little to select: top-p at chunk granularity always keeps the chunks of the
  step's own positions and the window's partial first chunk (GPT-OSS's 128-token windows: 3 of 9 chunks).

At ``W >= 2048`` (128 chunks of 16; Mistral-7B-v0.1's and Gemma 2's 4,096-token windows) the window is a long
read at every context past it, and on models whose every layer has a window it is the only read there is to cut:
those layers stay candidates, calibrated like full layers.
"""

from __future__ import annotations

MIN_SPARSE_WINDOW = 2048  # tokens: shorter sliding windows stay dense (see the module docstring)


def short_window_layers(windows: list[int | None], min_sparse_window: int = MIN_SPARSE_WINDOW) -> list[int]:
    """Layers whose sliding window (``windows[j]``, None = full attention) is shorter than ``min_sparse_window``."""
    if min_sparse_window < 0:
        raise ValueError(f"min_sparse_window must be >= 0 tokens, got {min_sparse_window}")
    return [j for j, w in enumerate(windows) if w is not None and w < min_sparse_window]


def sparse_candidates(windows: list[int | None], dense_layers: int,
                      min_sparse_window: int = MIN_SPARSE_WINDOW) -> list[int]:
    """Layers that may read sparsely: from ``dense_layers`` on, minus :func:`short_window_layers`."""
    short = set(short_window_layers(windows, min_sparse_window))
    return [j for j in range(dense_layers, len(windows)) if j not in short]
