"""fineweb.py end to end: shards decode back to the source, are the same for any worker count,
resume exactly after a kill, and the offline default source fails with advice instead of a traceback."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from core import documents
from core.corpus import encode_document, tokenize_in_order
from core.errors import UserError
from core.shards import list_shards, open_shard, read_shard_info
from core.tokenizer import get_tokenizer
from tests.data_paths import FINEWEB_DOCS, SHAKESPEARE
from tests.stages import HANG_GUARD_SECONDS

FINEWEB = Path(fineweb.__file__)
# fineweb.main in a process that dies, as `kill -9` would, once the shard named by argv[1] holds tokens
# and more are on their way: the kill comes from the test side, no hook in the pipeline.
KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import fineweb
from core.shards import ShardWriter

killed_shard, write = sys.argv[1], ShardWriter.write

def write_or_die(self, tokens):
    if self.path.name == killed_shard and self.num_tokens:
        self.flush()  # what was written so far reaches the file, as with a real crash
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, tokens)

ShardWriter.write = write_or_die
fineweb.main(sys.argv[2:])
"""
EOT = "<|endoftext|>"
CHINESE = [
    "维基百科是一个自由内容、公开编辑且多语言的网络百科全书协作计划，通过维基的技术使得包括您在内的所有人都可以简单地使用网页浏览器修改其中的内容。",
    "长江是亚洲第一长河和世界第三长河，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海。",
    "《红楼梦》是中国古典四大名著之一，成书于清代乾隆年间，以贾、史、王、薛四大家族的兴衰为背景。",
    "数学是研究数量、结构以及空间等概念及其变化的一门学科，从某种角度看属于形式科学的一种。",
]


@pytest.fixture
def fineweb_jsonl() -> Path:
    return FINEWEB_DOCS


@pytest.fixture
def fineweb_docs(fineweb_jsonl: Path) -> list[str]:
    docs = [json.loads(line)["text"] for line in fineweb_jsonl.read_text().splitlines()]
    assert len(docs) == 150 and not any(EOT in doc for doc in docs)  # so that decoded text splits on EOT
    return docs


def build(*args: object) -> dict:
    return fineweb.main([str(arg) for arg in args])


def split_tokens(folder: Path, split: str, tokenizer: str = "gpt2") -> np.ndarray:
    if not list(folder.glob(f"*_{split}_*.bin")):
        return np.empty(0, dtype=np.uint32)
    return np.concatenate([open_shard(path, tokenizer) for path in list_shards(folder, split)])


def decode(folder: Path, split: str, tokenizer: str = "gpt2") -> str:
    return get_tokenizer(tokenizer).decode(split_tokens(folder, split, tokenizer).tolist())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_fineweb_jsonl_decodes_to_the_source_with_whole_documents_in_val(tmp_path: Path, fineweb_jsonl: Path,
                                                                         fineweb_docs: list[str]) -> None:
    manifest = build("--input", fineweb_jsonl, "--out", tmp_path, "--shard-size", 20000, "--val-tokens", 30000)
    val, train = decode(tmp_path, "val"), decode(tmp_path, "train")
    assert val + train == "".join(EOT + doc for doc in fineweb_docs)
    n_val = val.count(EOT)
    assert val == "".join(EOT + doc for doc in fineweb_docs[:n_val])  # val ends on a document boundary
    encoding = get_tokenizer("gpt2")
    val_sizes = [1 + len(encoding.encode_ordinary(doc)) for doc in fineweb_docs[: n_val + 1]]
    assert sum(val_sizes[:-1]) <= 30000 < sum(val_sizes)  # as many whole documents as fit
    train_sizes = [read_shard_info(path).num_tokens for path in list_shards(tmp_path, "train")]
    assert train_sizes[:-1] == [20000] * (len(train_sizes) - 1) and 0 < train_sizes[-1] <= 20000
    assert manifest["complete"] and manifest["resume"]["documents"] == {"val": n_val, "train": 150 - n_val}


def test_tinyshakespeare_is_one_document_or_one_per_paragraph(tmp_path: Path) -> None:
    source = SHAKESPEARE
    text = source.read_text()
    build("--input", source, "--out", tmp_path / "whole", "--val-tokens", 0)
    assert not list((tmp_path / "whole").glob("*_val_*"))
    assert decode(tmp_path / "whole", "train") == EOT + text

    build("--input", source, "--out", tmp_path / "paragraphs", "--txt-paragraphs", "--val-tokens", 5000)
    paragraphs = re.split(r"\n\s*\n", text.rstrip("\n"))
    assert len(paragraphs) > 7000
    decoded = decode(tmp_path / "paragraphs", "val") + decode(tmp_path / "paragraphs", "train")
    assert decoded == "".join(EOT + paragraph for paragraph in paragraphs)


def test_shards_are_byte_identical_for_one_and_two_workers(tmp_path: Path, fineweb_jsonl: Path) -> None:
    inputs = [fineweb_jsonl, SHAKESPEARE]  # 1.5M characters: batches of 256k, several in flight at once
    for workers in (1, 2):
        build("--input", *inputs, "--txt-paragraphs", "--out", tmp_path / str(workers), "--workers", workers,
              "--shard-size", 50000, "--val-tokens", 20000, "--shuffle-seed", 3, "--shuffle-window", 100)
    one, two = folder_bytes(tmp_path / "1"), folder_bytes(tmp_path / "2")
    assert len(one) > 8 and one == two


class OutOfOrderEncoding:
    """GPT-2's encoding, but every even document waits until the odd one after it is encoded, so that
    with a document per batch the batches surely finish out of order."""

    def __init__(self, docs: list[str]) -> None:
        self.encoding = get_tokenizer("gpt2")
        self.number = {id(doc): i for i, doc in enumerate(docs)}
        self.done = [threading.Event() for _ in docs]
        self.finished: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.encoding, name)

    def encode_to_numpy(self, text: str, **kwargs: object) -> np.ndarray:
        i = self.number[id(text)]
        if i % 2 == 0 and i + 1 < len(self.done):
            self.done[i + 1].wait(timeout=HANG_GUARD_SECONDS)
        tokens = self.encoding.encode_to_numpy(text, **kwargs)
        self.finished.append(i)
        self.done[i].set()
        return tokens


def test_tokenize_in_order_keeps_document_order(fineweb_docs: list[str]) -> None:
    docs = fineweb_docs[:24]
    encoding = OutOfOrderEncoding(docs)
    batches = list(tokenize_in_order(iter(docs), encoding, workers=4, batch_chars=1))  # a batch per document
    finished = encoding.finished
    assert sorted(finished) == list(range(len(docs)))
    assert all(finished.index(i + 1) < finished.index(i) for i in range(0, len(docs), 2))  # out of order, surely
    assert len(batches) == len(docs)
    tokens = [document.tolist() for batch in batches for document in batch]
    plain = get_tokenizer("gpt2")
    assert tokens == [[plain.eot_token, *plain.encode_ordinary(doc)] for doc in docs]


def test_documents_are_encoded_as_encode_ordinary_does() -> None:
    encoding = get_tokenizer("gpt2")
    for text in ("a literal <|endoftext|> is text", "a lone surrogate \ud800 here", "", "plain"):
        document = encode_document(encoding, text)
        assert document.tolist() == [50256, *encoding.encode_ordinary(text)]


def test_cl100k_shards_are_uint32_and_round_trip_chinese(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(3)), "completion": CHINESE[:3]})
    pq.write_table(table, tmp_path / "wiki_cn.parquet")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"completion": CHINESE[3]}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"completion": f"字面上的 {EOT} 只是文本"}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    build("--input", tmp_path / "wiki_cn.parquet", tmp_path / "more.jsonl.gz", "--text-column", "completion",
          "--tokenizer", "cl100k_base", "--out", out, "--val-tokens", 0, "--shard-size", 100)
    for path in list_shards(out, "train"):
        info = read_shard_info(path)
        assert (info.dtype, info.tokenizer, info.vocab_size) == (np.dtype("<u4"), "cl100k_base", 100277)
    tokens = split_tokens(out, "train", "cl100k_base")
    assert tokens.max() > 65535  # would not survive uint16
    assert (tokens == 100257).sum() == 5  # one <|endoftext|> per document; the literal one stays text
    expected = "".join(EOT + text for text in [*CHINESE, f"字面上的 {EOT} 只是文本"])
    assert decode(out, "train", "cl100k_base") == expected
    with pytest.raises(UserError, match=r"made with the 'cl100k_base' tokenizer, but the model uses 'gpt2'"):
        open_shard(list_shards(out, "train")[0], tokenizer="gpt2")


def test_shuffled_train_is_a_permutation_within_windows_and_never_touches_val(
        tmp_path: Path, fineweb_jsonl: Path, fineweb_docs: list[str]) -> None:
    common = ["--input", fineweb_jsonl, "--val-tokens", 30000, "--shard-size", 40000, "--shuffle-window", 25]
    build(*common, "--out", tmp_path / "a", "--shuffle-seed", 1)
    build(*common, "--out", tmp_path / "b", "--shuffle-seed", 1)
    build(*common, "--out", tmp_path / "c", "--shuffle-seed", 2)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert decode(tmp_path / "a", "train") != decode(tmp_path / "c", "train")

    val = decode(tmp_path / "a", "val").split(EOT)[1:]
    train = decode(tmp_path / "a", "train").split(EOT)[1:]
    assert val == fineweb_docs[: len(val)]  # val: the first documents, in order
    rest = fineweb_docs[len(val):]
    assert train != rest and len(train) == len(rest)
    for start in range(0, len(rest), 25):
        assert sorted(train[start: start + 25]) == sorted(rest[start: start + 25])


def test_shuffle_val_draws_val_from_the_whole_first_window(tmp_path: Path, fineweb_jsonl: Path,
                                                           fineweb_docs: list[str]) -> None:
    common = ["--input", fineweb_jsonl, "--val-tokens", 30000, "--shard-size", 40000, "--shuffle-seed", 1]
    build(*common, "--out", tmp_path / "whole", "--shuffle-val", "--shuffle-window", 150)
    val = decode(tmp_path / "whole", "val").split(EOT)[1:]
    train = decode(tmp_path / "whole", "train").split(EOT)[1:]
    assert sorted(val + train) == sorted(fineweb_docs)  # every document once, none split
    assert 5 < len(val) < 75
    positions = sorted(fineweb_docs.index(doc) for doc in val)
    assert positions[-1] > 100 and positions != list(range(len(val)))  # from across the corpus, not its opening

    build(*common, "--out", tmp_path / "small", "--shuffle-val", "--shuffle-window", 10)
    val = decode(tmp_path / "small", "val").split(EOT)[1:]
    # val spans windows of 10 when it holds more than 10 documents; each window a permutation of its own
    assert len(val) > 10 and sorted(val[:10]) == sorted(fineweb_docs[:10]) and val[:10] != fineweb_docs[:10]

    with pytest.raises(SystemExit):
        fineweb.parse_args(["--shuffle-val"])  # a shuffle-val without a seed: an argparse error, not a traceback


def test_max_docs_and_max_tokens_take_samples(tmp_path: Path, fineweb_jsonl: Path, fineweb_docs: list[str]) -> None:
    build("--input", fineweb_jsonl, "--out", tmp_path / "docs", "--max-docs", 10, "--val-tokens", 0)
    assert decode(tmp_path / "docs", "train") == "".join(EOT + doc for doc in fineweb_docs[:10])
    manifest = build("--input", fineweb_jsonl, "--out", tmp_path / "tokens", "--max-tokens", 12345,
                     "--val-tokens", 5000, "--shard-size", 4000)
    assert sum(split["tokens"] for split in manifest["splits"].values()) == 12345
    encoding = get_tokenizer("gpt2")
    stream = [token for doc in fineweb_docs for token in (encoding.eot_token, *encoding.encode_ordinary(doc))]
    written = np.concatenate([split_tokens(tmp_path / "tokens", "val"), split_tokens(tmp_path / "tokens", "train")])
    assert written.tolist() == stream[:12345]  # the first 12,345 tokens of the stream, the last document cut


def test_folders_are_read_recursively_in_sorted_order_without_dot_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    files = {"b.txt": "bee", "a/z.txt": "zed", "a/b/c.jsonl": '{"text": "c1"}\n{"text": "c2"}\n',
             "a/b/a.parquet": None, ".git/x.txt": "hidden folder", "a/.notes.txt": "hidden file",
             "a/b/.cache/y.jsonl": '{"text": "hidden deeper"}\n', "README.md": "not a supported type"}
    for name, text in files.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            pq.write_table(pa.table({"text": ["p1"]}), corpus / name)
        else:
            (corpus / name).write_text(text)
    (tmp_path / "last.txt").write_text("given after")
    build("--input", corpus, tmp_path / "last.txt", "--out", tmp_path / "out", "--val-tokens", 0)
    # The folder's files by path (a/b/a.parquet, a/b/c.jsonl, a/z.txt, b.txt), then the file given after it.
    assert decode(tmp_path / "out", "train") == "".join(EOT + doc for doc in ["p1", "c1", "c2", "zed", "bee",
                                                                               "given after"])


def test_val_holds_at_least_the_first_document(tmp_path: Path, fineweb_jsonl: Path, fineweb_docs: list[str]) -> None:
    build("--input", fineweb_jsonl, "--out", tmp_path, "--val-tokens", 1)
    assert decode(tmp_path, "val") == EOT + fineweb_docs[0]  # far more than one token, and val all the same
    assert decode(tmp_path, "train") == "".join(EOT + doc for doc in fineweb_docs[1:])


def test_val_size_defaults_to_one_shard(tmp_path: Path, fineweb_jsonl: Path, fineweb_docs: list[str]) -> None:
    assert fineweb_jsonl.stat().st_size // 4 // 10 > 5000  # a tenth of the file is more than a shard
    manifest = build("--input", fineweb_jsonl, "--out", tmp_path, "--shard-size", 5000)
    assert manifest["settings"]["val_tokens"] == 5000
    encoding = get_tokenizer("gpt2")
    sizes = [1 + len(encoding.encode_ordinary(doc)) for doc in fineweb_docs]
    n_val = next(n for n in range(len(sizes)) if sum(sizes[: n + 1]) > 5000)  # whole documents within 5,000
    assert decode(tmp_path, "val") == "".join(EOT + doc for doc in fineweb_docs[:n_val])
    assert [path.name for path in list_shards(tmp_path, "val")] == ["edufineweb_val_000000.bin"]


def test_a_small_corpus_keeps_most_of_itself_for_train_with_the_default_val(tmp_path: Path) -> None:
    """#21 case 8: a one-shard default val put every document of a corpus under 100M tokens into val."""
    manifest = build("--input", SHAKESPEARE, "--txt-paragraphs", "--out", tmp_path)
    val, train = (manifest["splits"][split]["tokens"] for split in ("val", "train"))
    assert manifest["settings"]["val_tokens"] == SHAKESPEARE.stat().st_size // 40
    assert 0.05 < val / (val + train) < 0.15  # about a tenth: the bytes' estimate of the tokens is close


def test_a_folder_holds_one_corpus(tmp_path: Path, fineweb_jsonl: Path, shakespeare_shards: Path) -> None:
    """#21 case 7: a second --prefix went into the same --out, and training then said that val was off."""
    build("--input", fineweb_jsonl, "--out", tmp_path / "out", "--prefix", "edu", "--val-tokens", 30000)
    before = folder_bytes(tmp_path / "out")
    with pytest.raises(UserError, match=r"--out .*out already holds edu_manifest.json, which is not of the corpus "
                                        r"'wiki' this command makes"):
        build("--input", fineweb_jsonl, "--out", tmp_path / "out", "--prefix", "wiki", "--val-tokens", 0)
    assert folder_bytes(tmp_path / "out") == before
    for path in shakespeare_shards.glob("*_train_*"):  # made by hand: train shards of a second corpus
        (tmp_path / "out" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(UserError, match=r"mixes the shards of several corpora \(edu, shakespeare\)"):
        list_shards(tmp_path / "out", "val")  # what training looks for first: the real cause, not "no val"


def test_a_prefix_is_a_name_not_a_path(tmp_path: Path, fineweb_jsonl: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        build("--input", fineweb_jsonl, "--out", tmp_path / "out", "--prefix", "a/b")
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "argument --prefix: 'a/b' is not a shard name prefix: use letters, digits, '.', '_' and '-' (no '/': the " \
           "folder is --out)" in line
    assert not (tmp_path / "out").exists()


def test_a_val_that_takes_everything_warns_that_train_is_empty(tmp_path: Path, fineweb_jsonl: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    build("--input", fineweb_jsonl, "--out", tmp_path, "--val-tokens", 10_000_000)
    assert "warning: train is empty: every document went to val (--val-tokens 10,000,000)" in capsys.readouterr().out
    assert not list(tmp_path.glob("*_train_*"))


def test_a_complete_run_is_not_redone_and_other_settings_are_refused(tmp_path: Path, fineweb_jsonl: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--input", fineweb_jsonl, "--out", tmp_path, "--shard-size", 20000, "--val-tokens", 30000]
    build(*args)
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    capsys.readouterr()
    build(*args, "--workers", 1)  # the worker count does not change the shards
    assert "complete already, nothing to do" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before
    with pytest.raises(UserError, match=r"other settings: shard_size \(20000 then, 30000 now\); "
                                        r"tokenizer \(\"gpt2\" then, \"cl100k_base\" now\)"):
        build(*args[:-4], "--shard-size", 30000, "--val-tokens", 30000, "--tokenizer", "cl100k_base")


def test_a_crash_between_a_shard_and_its_manifest_update_resumes(tmp_path: Path, fineweb_jsonl: Path) -> None:
    args = ["--input", fineweb_jsonl, "--shard-size", 20000, "--val-tokens", 30000]
    build(*args, "--out", tmp_path / "reference")
    out = tmp_path / "out"
    out.mkdir()
    (out / "edufineweb_val_000000.bin").write_bytes((tmp_path / "reference" / "edufineweb_val_000000.bin").read_bytes())
    manifest = json.loads((tmp_path / "reference" / "edufineweb_manifest.json").read_text())
    # As left by a kill right after the rename: the shard complete, the manifest from before it.
    manifest.update(complete=False, resume={"document": 0, "split": "val", "positions": {"val": 0, "train": 0},
                                            "documents": {"val": 0, "train": 0}},
                    splits={"val": {"shards": [], "tokens": 0}, "train": {"shards": [], "tokens": 0}})
    (out / "edufineweb_manifest.json").write_text(json.dumps(manifest))
    build(*args, "--out", out)
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")


def test_shards_of_unknown_origin_are_not_mixed_with(tmp_path: Path, fineweb_jsonl: Path) -> None:
    np.save(tmp_path / "edufineweb_train_000000.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(UserError, match=r"already holds shards \(edufineweb_train_000000.npy, ...\) but no "
                                        r"edufineweb_manifest.json"):
        build("--input", fineweb_jsonl, "--out", tmp_path)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing.jsonl: no such file or folder"):
        build("--input", tmp_path / "missing.jsonl", "--out", tmp_path / "out")
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(UserError, match=r"notes.md: unsupported file type"):
        build("--input", tmp_path / "notes.md", "--out", tmp_path / "out")
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"docs.jsonl:2 has no 'text' field \(fields: body\)"):
        build("--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out")
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"docs.jsonl:2: not a JSON line"):
        build("--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text"):
        build("--input", tmp_path / "latin1.txt", "--out", tmp_path / "out")


def run_script(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FINEWEB), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_SECONDS, check=False)


@pytest.mark.parametrize(("setting", "message"), [
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, r"the Hugging Face hub at 127.0.0.1:9 is unreachable"),
    ({"HF_HUB_OFFLINE": "1"}, r"HF_HUB_OFFLINE is set"),
])
def test_offline_default_source_fails_fast_with_advice(tmp_path: Path, setting: dict[str, str], message: str) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # unreachable on any machine, online or not
    env.update(setting)
    started = time.monotonic()
    result = run_script(cwd=tmp_path, env=env)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr) and "HuggingFaceFW/fineweb-edu" in result.stderr
    assert "--input" in result.stderr  # how to use local files instead
    assert not (tmp_path / "edu_fineweb10B").exists()


def test_default_source_streams_fineweb_edu_sample_10bt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fineweb_docs: list[str]) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path: str, **kwargs: object) -> Iterator[dict]:
        calls.append((path, kwargs))
        return iter({"text": doc, "score": 3.5} for doc in fineweb_docs)

    monkeypatch.setattr(documents, "require_hub_reachable", lambda what, advice: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    build("--val-tokens", 30000)
    assert calls == [("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train", "streaming": True})]
    out = tmp_path / "edu_fineweb10B"
    assert [path.name for path in list_shards(out, "val")] == ["edufineweb_val_000000.bin"]
    assert decode(out, "val") + decode(out, "train") == "".join(EOT + doc for doc in fineweb_docs)


def test_a_dropped_connection_resumes_where_the_shards_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           fineweb_docs: list[str]) -> None:
    datasets = pytest.importorskip("datasets")

    def rows(fail_after: int | None) -> Iterator[dict]:
        for number, doc in enumerate(fineweb_docs):
            if number == fail_after:
                raise ConnectionError("Connection reset by peer")
            yield {"text": doc}

    attempts = iter([100, None])
    monkeypatch.setattr(documents, "require_hub_reachable", lambda what, advice: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: rows(next(attempts)))
    args = ["--out", tmp_path / "out", "--val-tokens", 20000, "--shard-size", 10000]
    with pytest.raises(UserError, match=r"lost the connection to the hub after 100 rows .* run the same command again"):
        build(*args)
    build(*args)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: rows(None))
    build(*args[:1], tmp_path / "reference", *args[2:])
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "reference")


@pytest.mark.parametrize(("killed_shard", "shuffle"), [
    ("edufineweb_val_000001.bin", []),
    ("edufineweb_train_000002.bin", []),
    ("edufineweb_train_000002.bin", ["--shuffle-seed", "5", "--shuffle-window", "20"]),
    ("edufineweb_val_000001.bin", ["--shuffle-seed", "5", "--shuffle-window", "20", "--shuffle-val"]),
    ("edufineweb_train_000002.bin", ["--shuffle-seed", "5", "--shuffle-window", "20", "--shuffle-val"]),
    ("edufineweb_train_000001.bin", ["--shuffle-seed", "5", "--shuffle-window", "150", "--shuffle-val"]),
])
def test_a_writer_killed_mid_shard_leaves_nothing_readable_and_the_rerun_completes(
        tmp_path: Path, fineweb_jsonl: Path, killed_shard: str, shuffle: list[str]) -> None:
    args = ["--input", fineweb_jsonl, "--shard-size", 15000, "--val-tokens", 40000, *shuffle]
    build(*args, "--out", tmp_path / "reference")
    reference = folder_bytes(tmp_path / "reference")
    assert killed_shard in reference

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, killed_shard, *map(str, args), "--out", str(out)],
                            cwd=FINEWEB.parent, capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / killed_shard).exists()
    leftovers = [path for path in out.iterdir() if path.name != "edufineweb_manifest.json"]
    readable = {path.name for split in ("val", "train") if list(out.glob(f"*_{split}_*.bin"))
                for path in list_shards(out, split)}
    assert readable and len(readable) < len(leftovers)  # some shards done, and a half-written file
    for path in leftovers:
        if path.name in readable:
            assert path.read_bytes() == reference[path.name]  # complete, and right
        else:
            assert path.name == f".{killed_shard}.tmp" and path.stat().st_size > 64  # tokens were on their way
            with pytest.raises(UserError, match=r"is not a token shard"):
                open_shard(path)

    rerun = run_script(*args, "--out", out, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(r"resuming: \d+ shards complete; (skipping their [\d,]+ documents|they come from the first "
                     r"shuffle window)", rerun.stdout)
    assert folder_bytes(out) == reference
