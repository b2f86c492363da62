"""core/hellaswag.py and hellaswag.py against the plain one-example-per-forward reference."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.checkpoint import save_checkpoint
from core.errors import UserError
from core.hellaswag import Example, Result, hellaswag_file, read_hellaswag, score_examples, summarize
from core.hf import export_hf
from core.pretrained import load_model
from core.tokenizer import get_tokenizer
from model import GPT, GPTConfig
from tests.data_paths import HELLASWAG
from tests.hellaswag_reference import reference_scores
from tests.stages import HANG_GUARD_SECONDS
from tests.weights import redraw_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL_VOCAB = 1024
REFUSING_URL = "http://127.0.0.1:9/hellaswag_val.jsonl"  # the discard port: nothing listens, on any machine


def random_model(vocab_size: int, block_size: int = 256) -> GPT:
    torch.manual_seed(11)
    # Weights well away from GPT-2's init, so that the four endings' losses differ.
    return redraw_weights(GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64)))


@pytest.fixture(scope="module")
def hellaswag_path() -> Path:
    return HELLASWAG


@pytest.fixture(scope="module")
def examples(hellaswag_path: Path) -> list[Example]:
    """All 1000 shared examples, tokenized with GPT-2's BPE and then folded into a 1024-token
    vocabulary: the scoring is vocabulary-agnostic, and a 50257-way head would make the four
    full passes below cost minutes of CPU instead of seconds."""
    real = read_hellaswag(hellaswag_path, get_tokenizer("gpt2"))
    assert len(real) == 1000
    fold = lambda tokens: [t % SMALL_VOCAB for t in tokens]  # noqa: E731
    return [dataclasses.replace(e, context=fold(e.context), endings=[fold(x) for x in e.endings]) for e in real]


@pytest.fixture(scope="module")
def reference(examples: list[Example]) -> list[tuple]:
    model = random_model(SMALL_VOCAB)
    return [reference_scores(model, example) for example in examples]


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_predictions_equal_the_plain_reference(batch_size: int, examples: list[Example], reference: list) -> None:
    results = score_examples(random_model(SMALL_VOCAB), examples, batch_size=batch_size, progress=False)
    assert [r.index for r in results] == list(range(1000))
    for result, (pred, pred_norm, sum_losses, mean_losses) in zip(results, reference, strict=True):
        assert (result.pred, result.pred_norm) == (pred, pred_norm), f"example {result.index}"
        assert result.sum_losses == pytest.approx(sum_losses, rel=1e-4)
        assert result.mean_losses == pytest.approx(mean_losses, rel=1e-4)
    preds = {r.pred for r in results}
    assert len(preds) > 1  # a scorer stuck on one answer would pass the checks above only by luck


def test_hf_folder_and_our_checkpoint_score_the_same(tmp_path: Path, hellaswag_path: Path) -> None:
    model = random_model(50257)
    save_checkpoint(tmp_path / "ours", model, "gpt2")
    export_hf(model, tmp_path / "hf")
    examples = read_hellaswag(hellaswag_path, get_tokenizer("gpt2"), limit=40)
    ours = score_examples(load_model(str(tmp_path / "ours"))[0], examples, batch_size=8, progress=False)
    theirs = score_examples(load_model(str(tmp_path / "hf"))[0], examples, batch_size=8, progress=False)
    assert [(r.pred, r.pred_norm) for r in ours] == [(r.pred, r.pred_norm) for r in theirs]
    for mine, hf_result in zip(ours, theirs, strict=True):
        assert mine.sum_losses == pytest.approx(hf_result.sum_losses, rel=1e-5)


def test_summary_counts() -> None:
    # (label, pred, pred_norm): pred is right 3 times in 8, pred_norm 5 times, counted by hand.
    rows = [(0, 0, 0), (1, 1, 2), (2, 3, 2), (3, 3, 3), (0, 1, 0), (1, 2, 1), (2, 0, 3), (3, 1, 0)]
    results = [Result(i, label, pred, pred_norm, [0.0] * 4, [0.0] * 4)
               for i, (label, pred, pred_norm) in enumerate(rows)]
    assert summarize(results) == {"acc": 3 / 8, "acc_norm": 5 / 8, "n": 8}


def test_examples_are_tokenized_as_build_nanogpt_does(tmp_path: Path) -> None:
    # encode(ctx) and encode(" " + ending); the ids are tiktoken's, checked with transformers' GPT2Tokenizer.
    row = {"ctx": "A man is sitting on a roof. He", "label": 3,
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [example] = read_hellaswag(path, get_tokenizer("gpt2"))
    assert example.context == [32, 582, 318, 5586, 319, 257, 9753, 13, 679]
    assert example.endings == [[318, 1262, 14441, 284, 14441, 257, 5166, 286, 1341, 271, 13],
                               [318, 34759, 1241, 19867, 572, 13],
                               [318, 4769, 257, 6437, 1134, 338, 23441, 13],
                               [4940, 10427, 510, 9753, 278, 319, 257, 9753, 13]]
    assert (example.index, example.label) == (0, 3)


GOOD = {"ctx": "A man is", "endings": ["a", "b", "c", "d"], "label": 1}


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: invalid JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "ctx"}), "line 2: missing field 'ctx'"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), "line 2: 'endings' must be a list of 4"),
    (json.dumps({**GOOD, "label": 4}), "line 2: 'label' must be 0, 1, 2 or 3"),
])
def test_bad_data_names_the_line(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        read_hellaswag(path, get_tokenizer("gpt2"))


# --- hellaswag.py, end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hellaswag") / "ckpt"
    save_checkpoint(folder, random_model(50257), "gpt2")
    return folder


def run(command: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **env}
    # The device and dtype pinned: with auto, a GPU box would run these on CUDA (and torchrun's rank 1 on a GPU
    # it may lack).
    return subprocess.run([*command, "--device", "cpu", "--dtype", "float32"], capture_output=True, text=True,
                          timeout=HANG_GUARD_SECONDS, cwd=ROOT, env=env)


def test_two_ranks_give_the_same_totals_as_one(checkpoint: Path, hellaswag_path: Path, tmp_path: Path) -> None:
    args = ["hellaswag.py", "-m", str(checkpoint), "--data", str(hellaswag_path), "--limit", "60", "--no-progress"]
    single = run([sys.executable, *args, "--output", str(tmp_path / "one.jsonl")], tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = run([*torchrun, *args, "--output", str(tmp_path / "two.jsonl")], tmp_path)
    assert double.returncode == 0, double.stderr
    one, two = json.loads(single.stdout), json.loads(double.stdout)
    assert one["n"] == two["n"] == 60
    assert (one["acc"], one["acc_norm"]) == (two["acc"], two["acc_norm"])
    per_example_one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    per_example_two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["index"] for r in per_example_two] == list(range(60))
    assert [(r["pred"], r["pred_norm"]) for r in per_example_one] == [
        (r["pred"], r["pred_norm"]) for r in per_example_two]


def test_examples_longer_than_the_model_are_left_out_with_a_note(hellaswag_path: Path, tmp_path: Path) -> None:
    """As the training loop does: a block-64 model scores the examples that fit, and says how many did not."""
    folder = tmp_path / "short"
    save_checkpoint(folder, random_model(50257, block_size=64), "gpt2")
    result = run([sys.executable, "hellaswag.py", "-m", str(folder), "--data", str(hellaswag_path), "--limit", "100",
                  "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr
    examples = read_hellaswag(hellaswag_path, get_tokenizer("gpt2"), limit=100)
    fitting = sum(len(e.context) + max(map(len, e.endings)) <= 64 for e in examples)
    assert 0 < fitting < 100  # the shared file has both kinds
    assert json.loads(result.stdout)["n"] == fitting
    assert f"note: {100 - fitting} of 100 examples are longer than block_size 64" in result.stderr


def test_offline_without_data_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    result = run([sys.executable, "hellaswag.py", "-m", str(checkpoint), "--limit", "5"], tmp_path,
                 GPT2_TOOLKIT_HELLASWAG_URL=REFUSING_URL)
    assert result.returncode == 2, result.stderr
    assert f"cannot download {REFUSING_URL}" in result.stderr and "--data PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").rglob("*.jsonl*"))  # no partial file left behind


def test_a_failed_download_ends_every_rank(checkpoint: Path, tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run([*torchrun, "hellaswag.py", "-m", str(checkpoint), "--limit", "5", "--no-progress"], tmp_path,
                 GPT2_TOOLKIT_HELLASWAG_URL=REFUSING_URL)
    assert result.returncode != 0
    assert result.stderr.count(f"cannot download {REFUSING_URL}") >= 2  # rank 0's message, raised by both ranks


@pytest.fixture
def html_server() -> Iterator[str]:
    """A loopback server that answers every GET with an HTML page and status 200, as a captive portal
    or a proxy's error page does; yields its URL."""

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!DOCTYPE html><html><body>Please sign in to the network</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_page_that_is_not_hellaswag_is_refused(html_server: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2_TOOLKIT_HELLASWAG_URL", html_server)
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=rf"{html_server} did not return HellaSwag JSONL \(it starts "
                                        r"'<!DOCTYPE html>.*--data PATH"):
        hellaswag_file()
    assert list(tmp_path.rglob("*.jsonl*")) == []  # neither the page nor a partial file is kept
