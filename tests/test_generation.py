"""core/generation.py and sample.py: KV-cache decoding against full recomputation and HF generate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel

from core import cpu_speedups, generation
from core.checkpoint import save_checkpoint
from core.generation import (
    Sampling,
    TextStream,
    candidates,
    compile_decode_step,
    decode_step,
    fit_to_context,
    generate,
    sample_next,
    static_cache_length,
)
from core.pretrained import load_model
from core.tokenizer import get_tokenizer
from model import GPT, GPTConfig, KVCache
from tests.stages import HANG_GUARD_SECONDS
from tests.weights import redraw_weights

ROOT = Path(__file__).resolve().parents[1]


def small_model(**overrides: object) -> GPT:
    torch.manual_seed(3)
    config = dict(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    # Larger weights than GPT-2's init, so that the argmax is not a near tie.
    return redraw_weights(GPT(GPTConfig(**{**config, **overrides})), std=0.5)


def recomputed_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens the plain way: the whole sequence through the model at every step, no cache."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(torch.tensor([sequence]))
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("opted_in", [False, True], ids=["plain", "sample.py's opt-in"])
def test_greedy_with_cache_equals_argmax_of_full_recomputation(opted_in: bool) -> None:
    model = small_model()
    if opted_in:  # sample.py's CPU speed-up: oneDNN's product over kept weight copies (core/cpu_speedups.py)
        cpu_speedups.speed_up_generation(model)
        assert type(model.lm_head) is cpu_speedups.PackedLinear
    prompt = [5, 17, 42, 3]
    generated = generate(model, prompt, num_samples=2, max_new_tokens=30, sampling=Sampling(greedy=True))
    expected = recomputed_greedy(model, prompt, 30)
    assert generated == [expected, expected]
    assert len(set(expected)) > 2  # not one token repeated, which would hide a wrong position or cache slot


def test_compiled_decode_equals_full_recomputation_and_compiles_before_generating() -> None:
    model = small_model()
    prompt = [5, 17, 42, 3]
    expected = recomputed_greedy(model, prompt, 30)
    assert compile_decode_step(model, 2, len(prompt), 30) > 0
    graphs = dict(counters["stats"])
    assert generate(model, prompt, 2, 30, Sampling(greedy=True), compiled=True) == [expected, expected]
    assert dict(counters["stats"]) == graphs  # nothing compiled while generating: no compile time in its tokens/s
    # A static cache, eagerly: the same tokens, attending over all 64 positions under a mask.
    cache = KVCache(model.config, 1, static_cache_length(33, model.config.block_size), static=True)
    assert cache.max_len == 64
    tokens, static = torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(30):
            tokens = decode_step(model, tokens, cache).argmax(-1, keepdim=True)  # (1, 1)
            static.append(tokens.item())
    assert static == expected and int(cache.pos) == 4 + 29  # the last new token is never fed back


def test_fixed_seed_reproduces_samples_and_another_seed_differs() -> None:
    model = small_model()

    def run(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, [1, 2, 3], 4, 20, Sampling(temperature=1.5), generator=generator)

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert len({tuple(row) for row in run(7)}) > 1  # rows of a batch are independent samples


def test_top_k_one_equals_greedy() -> None:
    model = small_model()
    greedy = generate(model, [9, 8], 3, 25, Sampling(greedy=True))
    generator = torch.Generator().manual_seed(0)
    top1 = generate(model, [9, 8], 3, 25, Sampling(top_k=1, temperature=3.0), generator=generator)
    assert top1 == greedy


@pytest.mark.parametrize("top_p, kept", [(0.3, [0]), (0.5, [0]), (0.7, [0, 2]), (0.75, [0, 2]), (0.76, [0, 1, 2]),
                                         (0.9, [0, 1, 2, 3]), (0.99, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: list[int]) -> None:
    # Sorted: 0.5, 0.25, 0.125, 0.09375, 0.03125; binary fractions, so the running sums are exact.
    probs = torch.tensor([[0.5, 0.125, 0.25, 0.09375, 0.03125]], dtype=torch.float64)
    logits, ids = candidates(probs.log(), Sampling(top_p=top_p))
    assert sorted(ids[0][torch.isfinite(logits[0])].tolist()) == kept


def test_top_k_then_top_p_keep_the_right_tokens() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept_logits, ids = candidates(logits, Sampling(top_k=2, temperature=2.0))
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(kept_logits, torch.tensor([[1.5, 1.0]]))
    kept_logits, ids = candidates(logits, Sampling(top_k=3, top_p=0.5))  # 3.0 alone has p > 0.5
    assert ids[0][torch.isfinite(kept_logits[0])].tolist() == [1]
    kept_logits, ids = candidates(logits, Sampling(top_p=1.0))  # no filter: the whole vocabulary
    assert ids is None and torch.equal(kept_logits, logits)


def test_samples_follow_the_candidate_probabilities() -> None:
    probs = torch.tensor([0.5, 0.125, 0.25, 0.09375, 0.03125])
    logits = probs.log().expand(20000, -1)
    draws = sample_next(logits, Sampling(top_p=0.8), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert counts[3:].tolist() == [0, 0]  # the tokens top-p cut are never drawn, not even once in 20000
    expected = torch.tensor([0.5, 0.125, 0.25]) / 0.875  # renormalised over the kept three
    torch.testing.assert_close(counts[:3] / draws.numel(), expected, atol=0.015, rtol=0)


def test_padded_vocab_ids_are_never_sampled() -> None:
    model = small_model(vocab_size=100, vocab_multiple=64)
    with torch.no_grad():  # make the 28 padding rows the most attractive tokens by far
        model.transformer.wte.weight[100:] = 50.0 * model.transformer.ln_f.weight.sign()
        model.transformer.ln_f.bias.zero_()
    generator = torch.Generator().manual_seed(0)
    rows = generate(model, [1, 2], 8, 40, Sampling(temperature=2.0), generator=generator)
    assert max(max(row) for row in rows) < 100


def test_stop_token_ends_each_sample() -> None:
    model = small_model()
    greedy = generate(model, [4], 1, 30, Sampling(greedy=True))[0]
    stop = greedy[5]
    first = greedy.index(stop)
    stopped = generate(model, [4], 2, 30, Sampling(greedy=True), stop_token=stop)
    assert stopped == [greedy[: first + 1]] * 2


def test_sampled_rows_stop_at_different_steps() -> None:
    model = small_model(vocab_size=8)  # a small vocabulary, so that every token comes up soon
    sampling = Sampling(temperature=4.0)  # flat enough that rows differ
    free = generate(model, [1], 6, 40, sampling, generator=torch.Generator().manual_seed(4))
    stop = next(token for token in range(8) if all(token in row for row in free))
    stopped = generate(model, [1], 6, 40, sampling, generator=torch.Generator().manual_seed(4), stop_token=stop)
    ends = set()
    for free_row, row in zip(free, stopped, strict=True):
        assert stop in free_row
        end = free_row.index(stop) + 1
        assert row == free_row[:end]  # the same draws up to and including the stop token, nothing after
        ends.add(end)
    assert len(ends) > 1


def test_greedy_ignores_temperature_zero() -> None:
    model = small_model()
    assert generate(model, [2], 1, 5, Sampling(greedy=True, temperature=0)) == generate(model, [2], 1, 5,
                                                                                          Sampling(greedy=True))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sampling(temperature=0)


def spread_out_model(seed: int, **overrides: object) -> GPT:
    """A random model whose greedy choices are not all one token: every embedding row has the same
    norm and the final LayerNorm no bias, so no token wins the argmax by the size of its embedding."""
    torch.manual_seed(seed)
    config = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    model = redraw_weights(GPT(GPTConfig(**{**config, **overrides})), std=0.5)
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()
        wte = model.transformer.wte.weight
        wte.mul_(2 / wte.norm(dim=1, keepdim=True))
    return model


def test_bfloat16_greedy_equals_float32_greedy_where_margins_are_wide() -> None:
    prompt = [1, 2, 3]
    for seed in range(9, 40):  # the first model whose 20 greedy choices all win by a wide margin (seed 9 today)
        model = spread_out_model(seed, vocab_size=16)
        expected = generate(model, prompt, 1, 20, Sampling(greedy=True))[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + expected]))[0][0, len(prompt) - 1 : -1]  # the 20 choices
        top_two = logits.topk(2, dim=-1).values
        if (top_two[:, 0] - top_two[:, 1]).min() > 0.3:  # ten times bfloat16's logit error here: no near tie
            break
    else:
        pytest.fail("no model with wide top-two margins among the seeds tried")
    assert generate(model.to(torch.bfloat16), prompt, 2, 20, Sampling(greedy=True)) == [expected] * 2
    rows = generate(model, prompt, 3, 20, Sampling(top_p=0.9), generator=torch.Generator().manual_seed(0))
    assert all(len(row) == 20 and max(row) < 16 for row in rows)


def decoded_logits(model: GPT, tokens: list[int], cache: KVCache) -> torch.Tensor:
    """The (len(tokens), padded vocab) logits of `tokens` fed one at a time through `cache`."""
    with torch.inference_mode():
        return torch.cat([decode_step(model, torch.tensor([[token]]), cache) for token in tokens])


def test_a_float32_cache_serves_a_bfloat16_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention runs in the cache's float32 (the model widens its queries): its logits are the
    float32 model's, as near as the bf16 model's own recomputed logits are, eagerly and over a static
    cache alike."""
    model = small_model().to(torch.bfloat16)
    tokens = [5, 17, 42, 3, 60, 8, 11, 90, 23, 1]
    with torch.inference_mode():
        expected = small_model()(torch.tensor([tokens]))[0][0]  # (T, V): the float32 model, no cache
        bfloat16_error = (model(torch.tensor([tokens]))[0][0].float() - expected).abs().max()
    eager = KVCache(model.config, 1, len(tokens), dtype=torch.float32)
    static = KVCache(model.config, 1, 64, dtype=torch.float32, static=True)  # index_put_ must widen
    for cache in (eager, static):
        logits = decoded_logits(model, tokens, cache)
        assert cache.k[0].dtype == torch.float32 and logits.dtype == torch.bfloat16
        assert (logits.float() - expected).abs().max() <= 1.5 * bfloat16_error
    # generate() keeps its cache in the model's dtype
    caches: list[KVCache] = []
    monkeypatch.setattr(generation, "KVCache", lambda *args, **kwargs: caches.append(KVCache(*args, **kwargs))
                        or caches[-1])
    generate(model, tokens[:4], 2, 5, Sampling(greedy=True))
    assert [cache.k[0].dtype for cache in caches] == [torch.bfloat16]



def test_generation_restores_training_mode() -> None:
    model = small_model(dropout=0.5).train()
    first = generate(model, [1, 2], 2, 10, Sampling(greedy=True))
    assert model.training
    assert generate(model, [1, 2], 2, 10, Sampling(greedy=True)) == first  # no dropout while generating


def test_fit_to_context_crops_prompt_from_the_left() -> None:
    with pytest.warns(UserWarning, match="cropped from the left"):
        prompt, new = fit_to_context(list(range(100)), 30, 64)
    assert prompt == list(range(65, 100)) and new == 30  # 35 + 30 - 1 = 64 positions fed to the model
    with pytest.warns(UserWarning, match="capped"):
        assert fit_to_context([1], 500, 64) == ([1], 64)


def test_text_stream_holds_back_split_characters() -> None:
    encoding = get_tokenizer("gpt2")
    text = "naïve café 你好 🙂!"
    stream = TextStream(encoding.decode_single_token_bytes)
    pieces = [stream.push(token) for token in encoding.encode_ordinary(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_greedy_tokens_equal_hf_generate(tmp_path: Path) -> None:
    # An HF model saved as save_pretrained does, drawn so that its greedy output wanders over many tokens:
    # the shared tiny model's greedy output is one or two tokens repeated, which proves little.
    torch.manual_seed(4)
    hf_config = GPT2Config(vocab_size=97, n_positions=48, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    reference = redraw_weights(GPT2LMHeadModel(hf_config), std=1.0)
    with torch.no_grad():
        reference.transformer.ln_f.bias.zero_()
        wte = reference.transformer.wte.weight
        wte.mul_(2 / wte.norm(dim=1, keepdim=True))
    reference.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    for prompt in ([5, 12, 7, 3], [42], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]):
        new = ours.config.block_size - len(prompt)
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(set(expected)) >= 5
        assert generate(ours, prompt, 1, new, Sampling(greedy=True)) == [expected]


# --- sample.py, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(folder, GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)), "gpt2")
    return folder


def run_sample(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # The device and dtype pinned: with auto, a GPU box would sample on CUDA, and a CPU with bfloat16
    # units in bfloat16, while the references here are float32 on the CPU.
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args, "--device", "cpu", "--dtype", "float32"],
                          input=stdin, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS, cwd=ROOT)


def test_sample_json_is_reproducible_and_decodes(checkpoint: Path) -> None:
    args = ("-m", str(checkpoint), "--json", "-n", "3", "--max-new-tokens", "12", "--seed", "5", "Hello, I'm a")
    first, second = run_sample(*args), run_sample(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result == json.loads(second.stdout)
    assert result["prompt_tokens"] == get_tokenizer("gpt2").encode_ordinary("Hello, I'm a")
    assert len(result["samples"]) == 3
    for sample in result["samples"]:
        assert len(sample["tokens"]) == 12
        assert sample["text"] == get_tokenizer("gpt2").decode(sample["tokens"])


def test_sample_compile_gives_the_eager_tokens_and_reports_compile_time_apart(checkpoint: Path) -> None:
    args = ("-m", str(checkpoint), "-n", "2", "--max-new-tokens", "12", "--top-k", "5", "Hello, I'm a")
    eager, compiled = run_sample(*args), run_sample(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout  # the same seed, the same samples
    assert re.search(r"\[decode step compiled in [\d.]+s, not counted in the tokens/s\]\n\[24 new tokens in ",
                     compiled.stderr), compiled.stderr


def test_sample_opts_into_the_cpu_speed_up_once_on_the_loaded_model(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """One call, on the model that then generates (core/cpu_speedups.py), never hidden in a loader."""
    import sample

    opted_in: list[torch.nn.Module] = []
    generated: list[torch.nn.Module] = []
    monkeypatch.setattr(sample, "speed_up_generation", opted_in.append)
    stream = sample.stream_tokens
    monkeypatch.setattr(sample, "stream_tokens",
                        lambda model, *a, **k: generated.append(model) or stream(model, *a, **k))
    monkeypatch.setattr(sys, "argv", ["sample.py", "-m", str(checkpoint), "--json", "--max-new-tokens", "2",
                                      "--device", "cpu", "--dtype", "float32", "Hello"])
    sample.main()
    assert len(opted_in) == 1 and generated == opted_in
    assert len(json.loads(capsys.readouterr().out)["samples"][0]["tokens"]) == 2


def test_sample_drops_the_line_break_that_ends_stdin(checkpoint: Path) -> None:
    result = run_sample("-m", str(checkpoint), "--json", "--max-new-tokens", "2", stdin="Once upon a time\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] == get_tokenizer("gpt2").encode_ordinary("Once upon a time")


def test_sample_reads_prompt_from_stdin_and_streams_text(checkpoint: Path) -> None:
    result = run_sample("-m", str(checkpoint), "-n", "2", "--max-new-tokens", "5", "--greedy", stdin="Once upon\n")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("> Once upon")]
    assert len(lines) == 2 and lines[0] == lines[1]  # greedy: both samples alike


def test_interactive_answers_two_prompts_and_exits_on_eof(checkpoint: Path) -> None:
    result = run_sample("-m", str(checkpoint), "--interactive", "--max-new-tokens", "4", "--greedy",
                        stdin="The first prompt\nThe second prompt\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 3  # two answers, then the prompt that met EOF
    assert "Traceback" not in result.stderr
    expected = generate(load_model(str(checkpoint))[0], get_tokenizer("gpt2").encode_ordinary("The second prompt"),
                        1, 4, Sampling(greedy=True))[0]
    assert get_tokenizer("gpt2").decode(expected) in result.stdout


def test_a_prompt_the_model_cannot_take_ends_that_prompt_not_the_session(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "small_vocab"
    save_checkpoint(folder, GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=1, n_head=2, n_embd=16)), "gpt2")
    result = run_sample("-m", str(folder), "--interactive", "--max-new-tokens", "3", "--greedy",
                        stdin="xylophone\nThe\n")  # gpt2 ids 87, 2645, 38656, then 464: only the second fits
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 3 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: the prompt has token id 38656, beyond this model's vocabulary of 1000"]
    assert "tokens/s" in result.stderr  # the second prompt was answered


def test_a_prompt_file_that_is_not_utf8_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1
    result = run_sample("-m", str(checkpoint), "--prompt-file", str(tmp_path / "prompt.txt"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is not UTF-8" in result.stderr and "prompt.txt" in result.stderr


ONCE_UPON_A_TIME = [7454, 2402, 257, 640]  # tiktoken's gpt2 ids of "Once upon a time"


def test_stop_at_eot_ends_the_sample_and_prompt_file_is_read(tmp_path: Path) -> None:
    # A model whose greedy continuation of the prompt has <|endoftext|> as its fourth token: swapping the
    # embedding rows of that token and <|endoftext|> (the head is tied) swaps them in the output too.
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    model = redraw_weights(GPT(config), std=0.5)
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()
        wte = model.transformer.wte.weight
        wte.div_(wte.norm(dim=1, keepdim=True))
        greedy = generate(model, ONCE_UPON_A_TIME, 1, 12, Sampling(greedy=True))[0]
        swapped = greedy[3]
        assert swapped not in greedy[:3] and swapped != 50256
        wte[[swapped, 50256]] = wte[[50256, swapped]]
    save_checkpoint(tmp_path / "ckpt", model, "gpt2")
    (tmp_path / "prompt.txt").write_text("Once upon a time\n")
    args = ("-m", str(tmp_path / "ckpt"), "--prompt-file", str(tmp_path / "prompt.txt"), "--json", "--greedy",
            "--max-new-tokens", "12")
    free, stopped = run_sample(*args), run_sample(*args, "--stop-at-eot")
    assert free.returncode == 0 and stopped.returncode == 0, free.stderr + stopped.stderr
    free, stopped = json.loads(free.stdout), json.loads(stopped.stdout)
    assert free["prompt_tokens"] == stopped["prompt_tokens"] == ONCE_UPON_A_TIME  # the final line break dropped
    free_tokens = free["samples"][0]["tokens"]
    assert len(free_tokens) == 12 and 50256 in free_tokens[1:]
    assert stopped["samples"][0]["tokens"] == free_tokens[: free_tokens.index(50256)]  # the EOT itself not shown


def test_empty_prompt_starts_from_eot_and_samples_from_the_top_50(checkpoint: Path) -> None:
    result = run_sample("-m", str(checkpoint), "--json", "-n", "3", "--max-new-tokens", "6", "")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["prompt_tokens"] == [50256]
    # The documented defaults: top-k 50 (as build-nanogpt), temperature 1, seed 42. This model's
    # distributions are nearly flat over 50257 tokens, so any other k would draw other tokens.
    model, _ = load_model(str(checkpoint))
    expected = generate(model, [50256], 3, 6, Sampling(top_k=50), generator=torch.Generator().manual_seed(42))
    assert [sample["tokens"] for sample in output["samples"]] == expected
    with torch.no_grad():
        for row in expected:
            logits, _ = model(torch.tensor([[50256, *row]]))
            top_50 = logits[0, :-1].topk(50, dim=-1).indices
            assert all(token in top_50[step] for step, token in enumerate(row))


@pytest.mark.parametrize("args, message", [
    (("-m", "./no/such/model", "hi"), "no such checkpoint file or folder"),
    (("--top-p", "1.5", "hi"), "top_p must be in (0, 1]"),
    (("--temperature", "0", "hi"), "temperature must be > 0"),
])
def test_sample_bad_input_is_a_clear_error(args: tuple, message: str, checkpoint: Path) -> None:
    if "-m" not in args:
        args = ("-m", str(checkpoint), *args)
    result = run_sample(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
