"""core/core_benchmark.py and evaluate.py: hand-made tasks on a model whose losses are known, the prompt
and span rules, the arithmetic, bad input, the download, DDP, and agreement with the plain reference
scorer (tests/core_reference.py) on the CORE slice beside the checkout."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import math
import os
import random
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.core_benchmark import (
    Task,
    TaskScore,
    candidates,
    centered_accuracy,
    core_metric,
    crop,
    evaluate_core,
    fewshot_indices,
    prepare,
    prepare_this_ranks_share,
    read_items,
    read_tasks,
    render_prompts,
)
from core.errors import UserError
from core.hf import export_hf
from core.scoring import Candidate
from core.tokenizer import get_tokenizer
from model import GPT, GPTConfig
from tests.core_files import make_bundle, write_jsonl
from tests.core_reference import first_lines, reference_item
from tests.stages import HANG_GUARD_SECONDS, run_stage
from tests.weights import redraw_weights

ROOT = Path(__file__).resolve().parents[1]
CORE_SLICE = ROOT.parent / "shared" / "data" / "core_eval"
REFUSING_URL = "http://127.0.0.1:9/eval_bundle.zip"  # the discard port: nothing listens, on any machine


# --- a model whose losses are known ---------------------------------------------------------------

class Letters:
    """A character-level tokenizer: a token is a character's code point; 0 starts every sequence."""
    name, eot_token = "letters", 0

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@dataclass
class KnownConfig:
    block_size: int


class AlphabetModel:
    """Predicts, after each letter, the next letter of the alphabet with logit 10 against 0 for each of the
    other 255 tokens, whatever came before; so a token's loss is log(e^10 + 255) - 10 when it is that
    letter and log(e^10 + 255) when not. After any other token (z included) it is uniform."""

    def __init__(self, block_size: int = 64) -> None:
        self.config = KnownConfig(block_size)
        self.device = torch.device("cpu")
        self.table = torch.zeros(256, 256, dtype=torch.float64)
        for c in range(ord("a"), ord("z")):
            self.table[c, c + 1] = 10.0

    def evaluating(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return idx

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[hidden]


HIT = math.log(math.exp(10) + 255) - 10
MISS = math.log(math.exp(10) + 255)
UNIFORM = math.log(256)  # after z, or any token that is not a letter from a to y


def task(task_type: str, path: Path, shots: int = 0, delimiter: str = "", baseline: float = 0.25) -> Task:
    return Task(f"my_{task_type}", task_type, shots, delimiter, baseline, path)


KNOWN_ITEMS = {
    "multiple_choice": [{"query": "abc", "choices": ["defg", "dxyz", "qqqq"], "gold": 0},
                        {"query": "jk", "choices": ["lzz", "lmn"], "gold": 1}],
    "schema": [{"context_options": ["xyz", "abc"], "continuation": "def", "gold": 1},
               {"context_options": ["uvw", "qq"], "continuation": "xy", "gold": 0}],
    "language_modeling": [{"context": "abc ", "continuation": "defgh"}, {"context": "klm", "continuation": "nop q"}],
}


@pytest.mark.parametrize("task_type", sorted(KNOWN_ITEMS))
def test_each_task_type_picks_the_right_answer(task_type: str, tmp_path: Path) -> None:
    t = task(task_type, write_jsonl(tmp_path / "t.jsonl", KNOWN_ITEMS[task_type]))
    model = AlphabetModel()
    scores, results = evaluate_core(model, [prepare(t, read_items(t), Letters(), 64)], progress=False)
    if task_type == "multiple_choice":
        # "defg" after "abc": d, e, f, g all hits; "dxyz": x misses (e was due), d, y and z hit; "qqqq": all miss
        assert results[0].mean_losses == pytest.approx([HIT, (3 * HIT + MISS) / 4, MISS])
        assert [(r.pred, r.correct) for r in results] == [(0, True), (1, True)]
    elif task_type == "schema":
        # "def" after "abc" (d from c: hit) and after "xyz" (d from z, after which all is uniform); e, f hit
        assert results[0].mean_losses == pytest.approx([(UNIFORM + 2 * HIT) / 3, HIT])
        assert [(r.pred, r.correct) for r in results] == [(1, True), (0, True)]
    else:
        # "abc " is trimmed, so "defgh" follows "c"; "nop q" breaks at the space
        assert results[0].mean_losses == pytest.approx([HIT])
        assert [r.correct for r in results] == [True, False]
    assert scores[0].accuracy == (1.0 if task_type != "language_modeling" else 0.5)


def test_ties_go_to_the_first_lowest_option(tmp_path: Path) -> None:
    t = task("multiple_choice", write_jsonl(tmp_path / "t.jsonl", [
        {"query": "a", "choices": ["qq", "bc", "bc", "zz"], "gold": 2}]))
    _, results = evaluate_core(AlphabetModel(), [prepare(t, read_items(t), Letters(), 64)], progress=False)
    assert results[0].pred == 1 and not results[0].correct


# --- prompts and spans ----------------------------------------------------------------------------

def test_the_fewshot_draw_is_dclms() -> None:
    for index in (0, 3, 9):
        expected = random.Random(1234 + index).sample([i for i in range(10) if i != index], 4)
        assert fewshot_indices(index, 10, 4) == expected
        assert index not in expected
    assert fewshot_indices(5, 10, 0) == []


def test_prompts_are_built_as_nanochat_builds_them(tmp_path: Path) -> None:
    items = [{"query": f"Q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    t = task("multiple_choice", tmp_path / "unused.jsonl", shots=2, delimiter="\nAnswer: ")
    first, second = fewshot_indices(4, 6, 2)
    shots = "".join(f"Q{j}\nAnswer: {items[j]['choices'][j % 2]}\n\n" for j in (first, second))
    assert render_prompts(t, items, 4) == [f"{shots}Q4\nAnswer: a4", f"{shots}Q4\nAnswer: b4"]
    lm = [{"context": f" c{i} ", "continuation": f"x{i}"} for i in range(3)]
    t = task("language_modeling", tmp_path / "unused.jsonl", shots=1, delimiter=" ")
    (j,) = fewshot_indices(0, 3, 1)
    assert render_prompts(t, lm, 0) == [f"c{j} x{j}\n\nc0", f"c{j} x{j}\n\nc0 x0"]  # trimmed; without: stripped


def test_spans_are_the_common_prefix_and_the_common_suffix(tmp_path: Path) -> None:
    tokenizer = get_tokenizer("gpt2")
    mc = task("multiple_choice", tmp_path / "u.jsonl", delimiter=" ")
    items = [{"query": "The sky is", "choices": ["blue today", "green", "blue again"], "gold": 0}]
    found = candidates(mc, items, 0, tokenizer, 1024)
    shared = found[0].start
    assert all(c.start == shared and c.end == len(c.tokens) and c.tokens[0] == tokenizer.eot_token for c in found)
    assert len({tuple(c.tokens[:shared]) for c in found}) == 1
    assert len({c.tokens[shared] for c in found}) > 1  # "blue" twice: still part of the span, as nanochat has it
    schema = task("schema", tmp_path / "u.jsonl", delimiter=" ")
    items = [{"context_options": ["The cat sat", "A dog lay"], "continuation": "on the mat.", "gold": 0}]
    found = candidates(schema, items, 0, tokenizer, 1024)
    suffix = tokenizer.encode_ordinary(" on the mat.")
    assert [c.tokens[c.start : c.end] for c in found] == [suffix, suffix]
    assert found[0].tokens[found[0].start - 1] != found[1].tokens[found[1].start - 1]
    lm = task("language_modeling", tmp_path / "u.jsonl", delimiter="\nAnswer: ")
    (found,) = candidates(lm, [{"context": "Q: capital of France?", "continuation": "Paris"}], 0, tokenizer, 1024)
    assert tokenizer.decode(found.tokens[found.start : found.end]) == " Paris"


def test_cropping_from_the_left_keeps_the_continuation(tmp_path: Path) -> None:
    tokenizer = get_tokenizer("gpt2")
    mc = task("multiple_choice", tmp_path / "u.jsonl", delimiter=" ")
    items = [{"query": "word " * 40, "choices": ["one two three", "four five"], "gold": 0}]
    full, cropped = candidates(mc, items, 0, tokenizer, 1024), candidates(mc, items, 0, tokenizer, 16)
    for whole, cut in zip(full, cropped, strict=True):
        assert len(cut.tokens) == 16 and cut.tokens == whole.tokens[-16:]
        assert cut.tokens[cut.start : cut.end] == whole.tokens[whole.start : whole.end]
        assert tokenizer.eot_token not in cut.tokens  # the start token is the first to go
    # a span longer than the context keeps what fits, each scored token after another
    assert crop(Candidate(list(range(10)), 2, 10), 4) == Candidate([6, 7, 8, 9], 1, 4)


def test_centered_accuracy_and_core() -> None:
    assert centered_accuracy(0.25, 0.25) == 0 and centered_accuracy(1.0, 0.4) == 1
    assert centered_accuracy(0.5, 0.25) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 0.0) == 0.1
    scores = [TaskScore("a", "schema", 0, 10, 0.5, centered_accuracy(0.5, 0.5), 0.0),
              TaskScore("b", "multiple_choice", 0, 10, 0.7, centered_accuracy(0.7, 0.25), 0.0),
              TaskScore("c", "language_modeling", 0, 10, 0.3, centered_accuracy(0.3, 0.0), 0.0)]
    assert core_metric(scores) == pytest.approx((0.0 + 0.6 + 0.3) / 3)


# --- a hand-made bundle ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def tiny_gpt(block_size: int = 128) -> GPT:
    torch.manual_seed(5)
    return redraw_weights(GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(tiny_gpt(), tmp_path_factory.mktemp("model") / "tiny")


def test_the_bundle_reads_as_nanochat_reads_it(bundle: Path) -> None:
    tasks = read_tasks(bundle)
    assert [(t.label, t.task_type, t.num_fewshot, t.delimiter) for t in tasks] == [
        ("my_mc", "multiple_choice", 2, "\nAnswer: "), ("my_schema", "schema", 2, " "),
        ("my_lm", "language_modeling", 2, " ")]
    assert [t.baseline for t in tasks] == pytest.approx([0.333333, 0.5, 0.0])
    assert [t.label for t in read_tasks(bundle, "my_lm, my_mc")] == ["my_lm", "my_mc"]
    assert len(read_items(tasks[0], limit=5)) == 5


def test_the_score_table_and_json(bundle: Path, model_folder: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    args = ["-m", str(model_folder), "--bundle", str(bundle), "--device", "cpu", "--dtype", "float32",
            "--no-progress", "--max-per-task", "10"]
    status, out, err = run_stage("evaluate", [*args, "--json", "--output", str(tmp_path / "items.jsonl")],
                                 monkeypatch, capsys)
    assert status == 0, err
    report = json.loads(out)
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [(r["task"], r["index"]) for r in items] == [(t, i) for t in ("my_mc", "my_schema", "my_lm")
                                                       for i in range(10)]
    baselines = {"my_mc": 0.333333, "my_schema": 0.5, "my_lm": 0.0}
    for label, scores in report["tasks"].items():
        accuracy = sum(r["correct"] for r in items if r["task"] == label) / 10
        assert scores["accuracy"] == pytest.approx(accuracy) and scores["examples"] == 10
        assert scores["centered"] == pytest.approx((accuracy - baselines[label]) / (1 - baselines[label]))
    assert report["core"] == pytest.approx(sum(s["centered"] for s in report["tasks"].values()) / 3)
    status, out, err = run_stage("evaluate", args, monkeypatch, capsys)
    assert status == 0, err
    assert out.splitlines()[-1].split()[:3] == ["CORE", "(3", "tasks)"]
    assert float(out.splitlines()[-1].split()[-2]) == pytest.approx(report["core"], abs=1e-4)


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"query": "q", "choices": ["a", "b"]}', "missing field 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "'gold' must be an index"),
    ('{"query": "q", "choices": "ab", "gold": 0}', "'choices' must be a list"),
    ('{"query": 3, "choices": ["a", "b"], "gold": 0}', "'query' must be a string"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_malformed_task_line_is_refused_with_file_and_line(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=f"{path}:2: {message}".replace("(", r"\(").replace("[", r"\[")):
        read_items(task("multiple_choice", path))


def test_a_bad_bundle_is_one_line(bundle: Path, model_folder: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    base = ["-m", str(model_folder), "--device", "cpu", "--dtype", "float32", "--no-progress"]
    for args, message in [(["--bundle", str(tmp_path)], "no core.yaml"),
                          (["--bundle", str(bundle), "--tasks", "my_mc,nope"], "unknown task 'nope'"),
                          (["--bundle", str(bundle), "--max-per-task", "2"], "needs at least 3")]:
        status, _, err = run_stage("evaluate", [*base, *args], monkeypatch, capsys)
        assert status == 2 and len(err.splitlines()) == 1 and message in err, err


# --- the download ---------------------------------------------------------------------------------

def test_offline_without_a_bundle_is_one_line(model_folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"), "GPT2_TOOLKIT_CORE_BUNDLE_URL": REFUSING_URL}
    result = subprocess.run([sys.executable, "evaluate.py", "-m", str(model_folder), "--device", "cpu"],
                            capture_output=True, text=True, timeout=HANG_GUARD_SECONDS, cwd=ROOT, env=env)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot download {REFUSING_URL}" in result.stderr and "--bundle DIR" in result.stderr
    assert not list((tmp_path / "cache").rglob("*.partial"))


@pytest.fixture
def bundle_server(bundle: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback server of the bundle as nanochat's zip (everything under eval_bundle/); yields its URL
    and the list of paths it was asked for."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                z.write(path, f"eval_bundle/{path.relative_to(bundle)}")
    body, requests = archive.getvalue(), []

    class Zip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Zip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip", requests
    server.shutdown()


def test_the_bundle_is_downloaded_once_into_the_cache(bundle_server: tuple[str, list[str]], model_folder: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    url, requests = bundle_server
    monkeypatch.setenv("GPT2_TOOLKIT_CORE_BUNDLE_URL", url)
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(tmp_path / "cache"))
    args = ["-m", str(model_folder), "--device", "cpu", "--dtype", "float32", "--no-progress", "--json"]
    for _ in range(2):
        status, out, err = run_stage("evaluate", args, monkeypatch, capsys)
        assert status == 0, err
        assert set(json.loads(out)["tasks"]) == {"my_mc", "my_schema", "my_lm"}
    assert requests == ["/eval_bundle.zip"]
    assert (tmp_path / "cache" / "core_eval" / "eval_bundle" / "core.yaml").is_file()
    assert not (tmp_path / "cache" / "core_eval" / "eval_bundle.zip").exists()


# --- several processes ----------------------------------------------------------------------------

def test_two_processes_give_the_same_results_as_one(bundle: Path, model_folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["evaluate.py", "-m", str(model_folder), "--bundle", str(bundle), "--device", "cpu", "--dtype", "float32",
            "--no-progress", "--batch-size", "3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    outputs = []
    for launcher, name in (([sys.executable], "one.jsonl"), (torchrun, "two.jsonl")):
        result = subprocess.run([*launcher, *args, "--output", str(tmp_path / name)], capture_output=True,
                                text=True, timeout=HANG_GUARD_SECONDS, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append([json.loads(line) for line in (tmp_path / name).read_text().splitlines()])
    one, two = outputs
    assert len(one) == 36 and [(r["task"], r["index"], r["correct"], r["pred"]) for r in one] == [
        (r["task"], r["index"], r["correct"], r["pred"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["mean_losses"] == pytest.approx(b["mean_losses"], abs=1e-4)


# --- the reference --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def core_slice() -> Path:
    """The 18-task slice of the CORE data beside the checkout: required in CI, skipped elsewhere."""
    if not (CORE_SLICE / "core.yaml").is_file():
        missing = f"the CORE slice is not at {CORE_SLICE}: put the shared data beside the checkout"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    return CORE_SLICE


def test_agrees_with_the_plain_reference_on_the_shared_slice(core_slice: Path, model_folder: Path) -> None:
    """Every example of the slice's first 12 per task, through a 128-token model (so that the 10-shot
    prompts are cropped): ours against tests/core_reference.py on transformers' GPT-2 with the same weights."""
    from transformers import GPT2LMHeadModel

    tokenizer = get_tokenizer("gpt2")
    hf = GPT2LMHeadModel.from_pretrained(model_folder).eval()
    model = tiny_gpt()
    tasks = read_tasks(core_slice)
    assert len(tasks) == 18
    _, ours = evaluate_core(model, prepare_this_ranks_share(tasks, tokenizer, 128, max_per_task=12), progress=False)

    @torch.inference_mode()
    def logits_of(tokens: list[int]) -> torch.Tensor:
        return hf(torch.tensor([tokens])).logits[0]

    theirs = []
    for t in tasks:
        items = first_lines(t.path, 12)
        theirs += [reference_item(logits_of, tokenizer.encode_ordinary, tokenizer.eot_token, 128, items, i,
                                  t.task_type, t.num_fewshot, t.delimiter) for i in range(len(items))]
    assert len(ours) == len(theirs) == 12 * 18
    assert [(r.correct, r.pred) for r in ours] == [(correct, pred) for correct, pred, _ in theirs]
    for result, (_, _, means) in zip(ours, theirs, strict=True):
        assert result.mean_losses == pytest.approx(means, abs=1e-4)
