"""GPT-1 as a model family: HF openai-gpt folders in and out, the KV cache, and its tokenizer, against
Hugging Face transformers (OpenAIGPTLMHeadModel, OpenAIGPTTokenizer) as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import OpenAIGPTLMHeadModel, OpenAIGPTTokenizer

from core import hf
from core.checkpoint import save_checkpoint
from core.errors import UserError
from core.gpt1_tokenizer import GPT1Tokenizer
from core.pretrained import load_model
from core.tokenizer import load_tokenizer, with_added_tokens
from model import GPT, GPTConfig, KVCache
from tests.gpt1_files import write_hf_gpt1_folder, write_tokenizer_files
from tests.stages import run_stage
from tests.weights import redraw_weights

TOLERANCE = 1e-5

VARIED_TEXT = [
    "The Story Cloze Test: Tom went to the store, and the store was closed.",
    "UPPER CASE, lower case, MiXeD CaSe; Title Case Words!",
    "I'm sure they'll say it isn't so, but we've been told that you'd agree: don't!",
    "Numbers: 42, 3.14159, 1,000,000 and 2024-01-15 at 10:30pm (about 99.5%).",
    "Punctuation -- dashes... ellipses?! [brackets] {braces} <angles> @at #hash $5 ^caret `tick` ~tilde",
    "Café, naïve, résumé, ÉCOLE, Ångström, façade: accents go, letters stay.",
    "Greek ΟΔΟΣ and σίσυφος, Chinese 日本語中文, quotes “curly” and ‘single’ — dashes – too…",
    "Unknown to the vocabulary: 😀, ß, ж, and the Cyrillic мир.",
    "Whitespace\tand\nnew lines\r\n  and   runs, a zero\u200bwidth space, NBSP\u00a0here, \u3000ideographic.",
    "Controls\x00 \x07bell \x7fdelete \ufffdreplacement are dropped.",
    "",
    "   ",
    "a",
    "tom's cat's toy's box",
]


@pytest.fixture(scope="module")
def hf_gpt1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openai-gpt")
    write_hf_gpt1_folder(folder)
    return folder


def random_tokens(config: GPTConfig, batch: int, length: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, config.vocab_size, (batch, length or config.block_size), generator=generator)


def test_hf_gpt1_logits_match_ours(hf_gpt1_folder: Path) -> None:
    hf_model = OpenAIGPTLMHeadModel.from_pretrained(hf_gpt1_folder).eval()
    ours, tokenizer = load_model(str(hf_gpt1_folder))
    assert tokenizer.name == "openai-gpt"
    assert (ours.config.post_ln, ours.config.final_ln, ours.config.gelu) == (True, False, "tanh")
    assert not any(name.startswith("transformer.ln_f") for name in ours.state_dict())
    assert ours.lm_head.weight is ours.transformer.wte.weight
    idx = random_tokens(ours.config, batch=3)
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0)
    # The comparison can fail: the exact GELU that the issue names, or GPT-2's pre-LN block, miss by far.
    # HF's openai-gpt computes "gelu" as gelu_new, the tanh approximation of OpenAI's GPT-1 code.
    for change in (dict(gelu="erf"), dict(post_ln=False)):
        other = GPT.from_state_dict(GPTConfig(**{**ours.config.to_dict(), **change}), ours.state_dict()).eval()
        with torch.no_grad():
            assert (other(idx)[0] - expected).abs().max() > 10 * TOLERANCE, change


def test_gpt1_export_round_trip_is_exact(hf_gpt1_folder: Path, tmp_path: Path) -> None:
    ours, tokenizer = load_model(str(hf_gpt1_folder))
    hf.export_hf(ours, tmp_path / "exported", tokenizer)
    original = load_file(hf_gpt1_folder / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert "transformer.tokens_embed.weight" in exported
    for key in original:
        assert torch.equal(exported[key], original[key]), key
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "exported" / name).read_bytes() == (hf_gpt1_folder / name).read_bytes()
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == "openai-gpt" and config["architectures"] == ["OpenAIGPTLMHeadModel"]
    reloaded = OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "exported").eval()
    idx = random_tokens(ours.config, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ours(idx)[0], atol=TOLERANCE, rtol=0)
    again, again_tokenizer = load_model(str(tmp_path / "exported"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))
    assert again_tokenizer.encode_ordinary(VARIED_TEXT[0]) == tokenizer.encode_ordinary(VARIED_TEXT[0])


def test_gpt1_kv_cache_decoding_matches_full_forward() -> None:
    config = GPTConfig(block_size=48, vocab_size=90, n_layer=3, n_head=4, n_embd=48, post_ln=True, final_ln=False)
    model = redraw_weights(GPT(config))
    idx = random_tokens(config, batch=3, length=30)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(config, batch_size=3, max_len=30)
        steps = [model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:12], kv_cache=cache)[0]]  # prefill in 2 chunks
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOLERANCE, rtol=0)


def test_gpt2_config_with_exact_gelu_loads(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_model = redraw_weights(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                                         activation_function="gelu", resid_pdrop=0.0,
                                                         embd_pdrop=0.0, attn_pdrop=0.0)))
    hf_model.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    assert ours.config.gelu == "erf"
    idx = random_tokens(ours.config, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_model(idx).logits, atol=TOLERANCE, rtol=0)


def test_shapes_that_no_hf_class_holds_are_refused(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=1, n_embd=8, post_ln=True))  # final LN kept
    with pytest.raises(UserError, match="no HF model class has this shape"):
        hf.export_hf(model, tmp_path)
    with pytest.raises(UserError, match="afn 'relu' is not supported"):
        hf.config_from_hf({"model_type": "openai-gpt", "afn": "relu", "n_positions": 8, "vocab_size": 20,
                           "n_layer": 1, "n_head": 1, "n_embd": 8})


# --- the tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_matches_hf_openai_gpt_tokenizer(hf_gpt1_folder: Path) -> None:
    reference = OpenAIGPTTokenizer.from_pretrained(hf_gpt1_folder)
    ours = GPT1Tokenizer.from_folder(hf_gpt1_folder)
    assert ours.n_vocab == len(json.loads((hf_gpt1_folder / "vocab.json").read_text()))
    long_text = " ".join(VARIED_TEXT) * 3
    for text in [*VARIED_TEXT, long_text]:
        expected = reference.encode(text)
        assert ours.encode_ordinary(text) == expected, text
        assert ours.decode(expected) == reference.decode(expected), text
    assert reference.unk_token_id in reference.encode(VARIED_TEXT[7])  # the test reaches <unk>
    assert len(set(reference.encode(long_text))) > 100  # and many merges


def test_tokenizer_without_unk_names_the_word(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    del vocab["<unk>"]
    vocab = {token: i for i, token in enumerate(vocab)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = GPT1Tokenizer.from_folder(tmp_path)
    assert tokenizer.decode(tokenizer.encode_ordinary("The end.")) == "the end ."
    with pytest.raises(UserError, match="'😀' has a character that is not in GPT-1's vocabulary"):
        tokenizer.encode_ordinary("smile 😀")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nt h e\n")
    with pytest.raises(UserError, match=r"merges\.txt, line 2: expected two symbols"):
        GPT1Tokenizer.from_folder(tmp_path)
    with pytest.raises(UserError, match=r"needs vocab\.json and merges\.txt"):
        GPT1Tokenizer.from_folder(tmp_path / "nowhere")


def test_checkpoint_of_gpt1_carries_its_tokenizer_and_added_tokens(hf_gpt1_folder: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(str(hf_gpt1_folder))
    grown = with_added_tokens(tokenizer, ["<|start|>", "<|extract|>"])
    config = GPTConfig(**{**model.config.to_dict(), "vocab_size": grown.n_vocab})
    bigger = GPT(config)
    save_checkpoint(tmp_path / "ckpt", bigger, grown, step=3)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["merges.txt", "meta.json", "model.safetensors",
                                                                     "vocab.json"]
    loaded, loaded_tokenizer = load_model(str(tmp_path / "ckpt"))
    assert loaded.config == config and loaded_tokenizer.n_vocab == tokenizer.n_vocab + 2
    ids = [*loaded_tokenizer.encode_ordinary("the story"), tokenizer.n_vocab + 1]
    assert loaded_tokenizer.decode(ids) == "the story<|extract|>"
    assert loaded_tokenizer.decode_single_token_bytes(tokenizer.n_vocab) == b"<|start|>"
    with pytest.raises(ValueError, match="cannot be found again by its name"):
        save_checkpoint(tmp_path / "other", bigger, "openai-gpt")
    with pytest.raises(UserError, match="read from a model folder"):
        load_tokenizer("openai-gpt")


def test_sample_and_hellaswag_accept_a_gpt1_folder(hf_gpt1_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    tokenizer = GPT1Tokenizer.from_folder(hf_gpt1_folder)
    model = ["-m", str(hf_gpt1_folder), "--device", "cpu", "--dtype", "float32"]
    status, out, err = run_stage("sample", [*model, "--json", "-n", "2", "--max-new-tokens", "5", "The story"],
                                 monkeypatch, capsys)
    assert status == 0, err
    output = json.loads(out)
    assert output["prompt_tokens"] == tokenizer.encode_ordinary("The story")
    assert [sample["text"] for sample in output["samples"]] == [tokenizer.decode(sample["tokens"])
                                                                for sample in output["samples"]]
    status, _, err = run_stage("sample", [*model, ""], monkeypatch, capsys)
    assert status == 2
    assert err.strip() == ("sample.py: error: the openai-gpt tokenizer has no <|endoftext|> token to start "
                           "from and the prompt '' has no tokens: give a prompt")
    data = tmp_path / "hellaswag.jsonl"
    rows = [{"ctx": "Tom went to the store.", "endings": ["He bought milk.", "It was closed.", "The sun set.",
                                                          "She was happy."], "label": i % 4} for i in range(5)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    status, out, err = run_stage("hellaswag", [*model, "--data", str(data), "--no-progress"], monkeypatch, capsys)
    assert status == 0, err
    assert json.loads(out)["n"] == 5
