"""Model-input windows start as ``tokenizer(text)`` starts (issue 26): the tokenizer's BOS where it adds one.

A tiny random Gemma 3 (sliding window 16 on two of its three layers, texts of 96 tokens: past the window) with a
word-level tokenizer that adds ``<bos>`` like Gemma's, built offline: calibration and holdout windows and evaluation
texts start with BOS, and the evaluation's dense perplexity is transformers' own on ``tokenizer(text)``. With the
shipped SmolLM2 tokenizer (which adds no BOS) windows are what they were before the prefix existed.
"""

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from artifact_factory import make_artifact
from pipelines import calibration_tasks as T
from pipelines.corpus import model_window, windows_from_token_lists
from pipelines.eval_text import evaluation_windows
from pipelines.evaluate import run_methods
from pipelines.sparse_eval import Method
from specattn_runtime import SpecAttnRuntime, hooks
from specattn_runtime.artifact import ArtifactError, load_artifact, save_artifact, window_metadata
from specattn_runtime.fingerprint import config_hash, tokenizer_hash, weights_hash
from specattn_runtime.models import load_tokenizer, special_prefix

BOS, EOS, VOCAB, N_TOKENS, WINDOW = 1, 2, 128, 96, 16
WORDS = [f"w{i}" for i in range(VOCAB - 3)]  # ids 3 .. 127


def bos_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Whitespace words -> ids, with a post-processor that puts ``<bos>`` first (as Gemma's and Llama's do)."""
    vocab = {"<unk>": 0, "<bos>": BOS, "<eos>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>")


def text(seed: int, n_words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A saved random Gemma 3 (layers: sliding 16, full, sliding 16) with the BOS tokenizer."""
    d = tmp_path_factory.mktemp("gemma3-bos")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=False,
        initializer_range=0.2, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norm weights start at 0: vary them, or the random model is nearly uniform
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(d)
    bos_tokenizer().save_pretrained(d)
    return d


def test_the_prefix_is_read_off_the_tokenizer(gemma_dir):
    tok = load_tokenizer(gemma_dir)
    assert special_prefix(tok) == [BOS]
    assert model_window([BOS], list(range(10, 20)), 3, 5) == [BOS, 13, 14, 15, 16]
    with pytest.raises(ValueError, match="no room for text"):
        model_window([BOS], [5, 6], 0, 1)
    with pytest.raises(ValueError, match="the text has 4"):
        model_window([BOS], [5, 6, 7, 8], 2, 4)


def test_calibration_and_holdout_windows_start_with_bos(gemma_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [text(i, 70) for i in range(5)]  # document 4 is the holdout (every 5th)
    for i, d in enumerate(docs):
        (corpus / f"doc{i}.txt").write_text(d)
    tok = load_tokenizer(gemma_dir)
    info = T.load_corpus.fn(str(corpus), str(gemma_dir), tokenizer_hash(gemma_dir), 48, 4, 1, str(tmp_path / "w"))
    win = load_file(info["path"])
    assert info["window_prefix"] == [BOS] and win["calibration"].shape == (4, 48)
    for split in ("calibration", "holdout"):
        assert (win[split][:, 0] == BOS).all() and (win[split][:, 1:] != BOS).all(), split
    # a document's first window is what the model sees at generation time for that text
    assert win["calibration"][0].tolist() == tok(docs[0]).input_ids[:48]
    assert win["holdout"][0].tolist() == tok(docs[4]).input_ids[:48]
    # later windows continue the stream (documents separated by EOS) after a fresh BOS
    stream = [t for d in docs[:4] for t in tok(d, add_special_tokens=False).input_ids + [EOS]]
    assert win["calibration"][1].tolist() == [BOS] + stream[47:94]


@torch.no_grad()
def test_evaluation_texts_start_with_bos_and_dense_perplexity_is_transformers(gemma_dir):
    books = {"a": text(10, 150), "b": text(11, 150)}
    tok = load_tokenizer(gemma_dir)
    windows, labels, prefix = evaluation_windows(books, tok, N_TOKENS, 2)
    assert prefix == [BOS] and labels == ["a[0]", "b[0]"]
    for w, book in zip(windows, books.values()):
        assert w.tolist() == tok(book).input_ids[:N_TOKENS]  # default special tokens: <bos> first
    layer_map, prefill = [-1, -1, -1], 10  # ceil(0.1 * 96)
    rows = run_methods(str(gemma_dir), str(gemma_dir), windows, layer_map, [Method("dense", "dense")], 16, 0.1,
                       progress=False)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager").eval()

    def perplexity(batch: torch.Tensor) -> float:  # the protocol's scored tokens: prefill + 1 .. T - 1
        lp = torch.log_softmax(ref_model(batch).logits[:, prefill:-1].double(), -1)
        return torch.exp(-lp.gather(-1, batch[:, prefill + 1 :, None]).mean()).item()

    with_bos = torch.tensor([tok(b).input_ids[:N_TOKENS] for b in books.values()])
    assert rows["dense"]["perplexity"] == pytest.approx(perplexity(with_bos), rel=1e-5)
    # and the BOS matters to this model: without it (the old windows) the perplexity is another number
    without = torch.tensor([tok(b, add_special_tokens=False).input_ids[:N_TOKENS] for b in books.values()])
    assert abs(perplexity(without) / perplexity(with_bos) - 1) > 1e-3


def test_without_bos_windows_are_unchanged(quick_pair):
    """The shipped SmolLM2 tokenizer adds no BOS (its ``bos_token`` exists but is not prepended): windows are
    the token stream cut as before the prefix existed, so the quick pair's artifacts and numbers stay."""
    tok = load_tokenizer(quick_pair[1])
    assert tok.bos_token_id is not None and special_prefix(tok) == []
    docs = ["It is a truth universally acknowledged. " * 40, "The Dashwood family had long been settled. " * 40]
    ids = [tok(d, add_special_tokens=False).input_ids for d in docs]
    w = windows_from_token_lists(ids, 64, 5, tok.eos_token_id, prefix=special_prefix(tok))
    stream = [t for d in ids for t in d + [tok.eos_token_id]]
    assert torch.equal(w, torch.tensor(stream[: w.shape[0] * 64]).view(-1, 64)) and w.shape[0] == 5
    books = dict(zip("ab", docs))
    windows, _, prefix = evaluation_windows(books, tok, 128, 3)
    old = {k: tok(v[: 8 * 128 * 2], add_special_tokens=False).input_ids for k, v in books.items()}
    assert prefix == [] and windows.tolist() == [old["a"][:128], old["b"][:128], old["a"][128:256]]


def test_artifacts_record_the_prefix_and_older_ones_still_load(tmp_path):
    art = make_artifact()
    old = save_artifact(art, tmp_path / "old.safetensors")  # no window metadata: written before it existed
    assert load_artifact(old).window_prefix is None
    new = dataclasses.replace(art, metadata={**art.metadata, **window_metadata([BOS])})
    loaded = load_artifact(save_artifact(new, tmp_path / "new.safetensors"))
    assert loaded.window_prefix == [BOS] and loaded.metadata["windows_start_with_bos"] == "true"
    assert window_metadata([]) == {"windows_start_with_bos": "false", "window_prefix": "[]"}
    for bad, match in (({"window_prefix": "[1]"}, "not the rest"),
                       ({**window_metadata([BOS]), "windows_start_with_bos": "false"}, "expected 'true'"),
                       ({**window_metadata([]), "window_prefix": '["<bos>"]'}, "list of token ids")):
        with pytest.raises(ArtifactError, match=match):
            save_artifact(dataclasses.replace(art, metadata={**art.metadata, **bad}), tmp_path / "bad.safetensors")


def test_runtime_warns_once_when_a_prompt_lacks_the_calibrated_bos(gemma_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation=hooks.register())
    art = make_artifact(n_t=3, n_d=3, dense=1)
    art = dataclasses.replace(art, layer_map=torch.tensor([-1, 1, 2], dtype=torch.int32),
                              metadata={**art.metadata, **window_metadata([BOS])})

    def bos_warnings(rt, prompts) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for prompt in prompts:
                rt.generate(prompt, 2, k=2, eos_token_id=None)
        return [w for w in caught if "calibrated on windows starting with" in str(w.message)]

    rt = SpecAttnRuntime(art, model, model)
    assert bos_warnings(rt, [[BOS, 5, 6, 7]]) == []  # starts with BOS: silent
    caught = bos_warnings(rt, [[5, 6, 7], [8, 6, 7], [9]])  # once per runtime, not per call
    assert len(caught) == 1 and caught[0].category is UserWarning and caught[0].filename == __file__
    assert json.loads(art.metadata["window_prefix"]) == [BOS]
    # a tokenizer without BOS, or an artifact older than the window metadata: never a warning
    no_prefix = dataclasses.replace(art, metadata={**art.metadata, **window_metadata([])})
    older = make_artifact(n_t=3, n_d=3, dense=1)
    for a in (no_prefix, older):
        assert bos_warnings(SpecAttnRuntime(a, model, model), [[5, 6, 7]]) == []


def test_loading_refuses_a_tokenizer_whose_bos_setting_changed(gemma_dir, tmp_path):
    """``tokenizer_hash`` covers vocabulary and merges, not the post-processor that adds BOS: the artifact's
    ``window_prefix`` catches a tokenizer re-saved without it, before any model loads."""
    fingerprint = json.dumps({"name": "gemma3-bos", "config_hash": config_hash(gemma_dir),
                              "weights_hash": weights_hash(gemma_dir), "n_layers": 3})
    art = make_artifact(n_t=3, n_d=3, dense=1)
    art = dataclasses.replace(art, metadata={**art.metadata, "draft_model": fingerprint, "target_model": fingerprint,
                                             "tokenizer_hash": tokenizer_hash(gemma_dir), **window_metadata([BOS])})
    path = save_artifact(art, tmp_path / "bos.safetensors")
    assert SpecAttnRuntime.from_artifact(path, target=gemma_dir, draft=gemma_dir).tokenizer("w1").input_ids[0] == BOS

    no_bos = tmp_path / "gemma3-no-bos"
    shutil.copytree(gemma_dir, no_bos)
    tok = json.loads((no_bos / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (no_bos / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_hash(no_bos) == tokenizer_hash(gemma_dir)  # the hash cannot tell them apart
    with pytest.raises(ValueError, match=r"windows that start with \[1\].*puts \[\] before text"):
        SpecAttnRuntime.from_artifact(path, target=no_bos, draft=no_bos)
    rt = SpecAttnRuntime.from_artifact(path, target=no_bos, draft=no_bos, allow_mismatch=True)
    assert special_prefix(rt.tokenizer) == []
