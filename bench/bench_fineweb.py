"""Benchmark: fineweb.py's tokens/s against tiktoken's own ceiling, and its peak memory.

    python bench/bench_fineweb.py                  # a 24 MB corpus, 2 workers, 3 rounds
    python bench/bench_fineweb.py --size-mb 200 --workers 4

It builds a JSONL corpus of at least --size-mb MB by repeating the texts that ship with the
repository (the FineWeb-Edu documents in tests/data/text, and tiny Shakespeare in ~4 KB documents),
then alternates, round by round,
  - the ceiling: tiktoken's `encode_ordinary_batch(texts, num_threads=W)` on the same documents,
    already in memory, results thrown away;
  - fineweb.py: `main()` in a fresh child process with --workers W: reading the JSONL, tokenizing,
    writing and fsyncing shards; the child reports its own peak RSS (VmHWM);
  - the whole run, as a user types it: `python fineweb.py --input corpus.jsonl --workers W`, timed
    from outside, less the start-up (imports, loading the tokenizer) timed on a one-document corpus.
Goals: main() at least 0.85 of the ceiling, the whole run at least 0.9, peak RSS under 100 MB
whatever the corpus size.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cli import StageParser  # noqa: E402
from core.tokenizer import get_tokenizer  # noqa: E402
from tests.data_paths import FINEWEB_DOCS, SHAKESPEARE  # noqa: E402

SHAKESPEARE_DOC_CHARS = 4000
CEILING_BATCH_DOCS = 1000  # encode_ordinary_batch returns lists of ints: keep them few at a time
GOAL_RATIO = 0.85
GOAL_WHOLE_RUN_RATIO = 0.9
GOAL_RSS_MB = 100


def build_corpus(path: Path, size_mb: float) -> list[str]:
    """Write the corpus as JSONL and return its documents."""
    fineweb = [json.loads(line)["text"] for line in FINEWEB_DOCS.open()]
    shakespeare = []
    chunk = ""
    for paragraph in SHAKESPEARE.read_text().split("\n\n"):
        chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
        if len(chunk) >= SHAKESPEARE_DOC_CHARS:
            shakespeare.append(chunk)
            chunk = ""
    unit = fineweb + shakespeare
    documents = []
    with path.open("w") as f:
        while f.tell() < size_mb * 1e6:
            for text in unit:
                f.write(json.dumps({"text": text}) + "\n")
            documents.extend(unit)
    return documents


def measure_ceiling(documents: list[str], tokenizer: str, workers: int) -> tuple[int, float]:
    """Text tokens and seconds of tiktoken's encode_ordinary_batch over all documents."""
    encoding = get_tokenizer(tokenizer)
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(documents), CEILING_BATCH_DOCS):
        batch = encoding.encode_ordinary_batch(documents[start: start + CEILING_BATCH_DOCS], num_threads=workers)
        tokens += sum(map(len, batch))
    return tokens, time.perf_counter() - started


def measure_fineweb(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict[str, float]:
    """Tokens written (text tokens + one <|endoftext|> per document), documents, seconds and peak RSS,
    from a child process."""
    child = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(out), tokenizer, str(workers)],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        sys.exit(f"fineweb.py failed:\n{child.stdout}\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def time_whole_run(corpus: Path, out: Path, tokenizer: str, workers: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of `python fineweb.py --input CORPUS ...`, start-up included.

    The peak is the child's VmHWM, read while it runs: its ru_maxrss would count this process's
    memory (the corpus held for the ceiling), which the child shares between fork and exec."""
    command = [sys.executable, str(ROOT / "fineweb.py"), "--input", str(corpus), "--out", str(out),
               "--tokenizer", tokenizer, "--workers", str(workers), "--val-tokens", "1000000"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_mb = 0.0
    while child.poll() is None:
        peak_mb = max(peak_mb, vm_hwm_mb(Path(f"/proc/{child.pid}/status")) or 0.0)
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return seconds, peak_mb


def run_child(corpus: str, out: str, tokenizer: str, workers: str) -> None:
    """In the child: time fineweb.main alone (the tokenizer is loaded before the clock starts)."""
    import fineweb

    get_tokenizer(tokenizer)
    started = time.perf_counter()
    manifest = fineweb.main(["--input", corpus, "--out", out, "--tokenizer", tokenizer, "--workers", workers,
                             "--val-tokens", "1000000"])
    seconds = time.perf_counter() - started
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    print(json.dumps({"tokens": tokens, "documents": manifest["resume"]["document"], "seconds": seconds,
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, where Linux has it: ru_maxrss would also count
    the parent's memory at the fork that started us."""
    peak = vm_hwm_mb(Path("/proc/self/status"))
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def vm_hwm_mb(status: Path) -> float | None:
    """The VmHWM of a /proc/PID/status file; None without /proc, or once the process has exited."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--size-mb", type=float, default=24, help="corpus size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="threads for both sides (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", help="(default: %(default)s)")
    args = parser.parse_args()
    from bench.hardware import describe_hardware  # here, not at the top: it imports torch, which the child must not

    print(f"hardware: {describe_hardware()}, tiktoken {version('tiktoken')}, numpy {version('numpy')}")
    with tempfile.TemporaryDirectory(prefix="bench_fineweb_") as folder:
        corpus = Path(folder) / "corpus.jsonl"
        documents = build_corpus(corpus, args.size_mb)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {len(documents):,} documents; "
              f"{args.tokenizer}, {args.workers} workers, {args.rounds} rounds")
        one_document = Path(folder) / "one_document.jsonl"
        one_document.write_text(json.dumps({"text": documents[0]}) + "\n")
        ceiling, pipeline, whole_run, peak_rss = [], [], [], []
        for round_number in range(args.rounds):
            text_tokens, seconds = measure_ceiling(documents, args.tokenizer, args.workers)
            ceiling.append(text_tokens / seconds)
            out = Path(folder) / f"shards_{round_number}"
            result = measure_fineweb(corpus, out, args.tokenizer, args.workers)
            if (result["tokens"], result["documents"]) != (text_tokens + len(documents), len(documents)):
                sys.exit(f"fineweb.py wrote {result['tokens']:,} tokens of {result['documents']:,} documents; "
                         f"expected {text_tokens + len(documents):,} of {len(documents):,}")
            pipeline.append(text_tokens / result["seconds"])
            peak_rss.append(result["peak_rss_mb"])
            startup, _ = time_whole_run(one_document, Path(folder) / f"startup_{round_number}", args.tokenizer,
                                        args.workers)
            whole, whole_rss = time_whole_run(corpus, Path(folder) / f"whole_{round_number}", args.tokenizer,
                                              args.workers)
            whole_run.append(text_tokens / (whole - startup))
            peak_rss.append(whole_rss)
            print(f"  round {round_number + 1}: ceiling {ceiling[-1] / 1e6:.2f}M tokens/s ({seconds:.2f} s), "
                  f"fineweb.main {pipeline[-1] / 1e6:.2f}M tokens/s ({result['seconds']:.2f} s, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB), whole run {whole_run[-1] / 1e6:.2f}M tokens/s "
                  f"({whole:.2f} s less {startup:.2f} s of start-up; peak RSS {whole_rss:.0f} MB)")
            for run in (out, Path(folder) / f"startup_{round_number}", Path(folder) / f"whole_{round_number}"):
                for shard in run.iterdir():
                    shard.unlink()
    # The machine may be shared: each round's ratio compares two runs made seconds apart, so their median
    # is the figure that noise moves least; the best of each side is printed beside it.
    ratio = statistics.median(ours / theirs for ours, theirs in zip(pipeline, ceiling, strict=True))
    print(f"ceiling (tiktoken encode_ordinary_batch, {args.workers} threads): best {max(ceiling) / 1e6:.2f}M tokens/s")
    print(f"fineweb.py ({args.workers} workers, read + tokenize + write):    best {max(pipeline) / 1e6:.2f}M tokens/s")
    print(f"ratio: {ratio:.3f} median of the rounds, {max(pipeline) / max(ceiling):.3f} best to best "
          f"(goal >= {GOAL_RATIO}) {'ok' if ratio >= GOAL_RATIO else 'MISSED'}")
    whole_ratio = statistics.median(ours / theirs for ours, theirs in zip(whole_run, ceiling, strict=True))
    print(f"whole run (python fineweb.py, start-up subtracted):  best {max(whole_run) / 1e6:.2f}M tokens/s; "
          f"ratio {whole_ratio:.3f} median of the rounds (goal >= {GOAL_WHOLE_RUN_RATIO}) "
          f"{'ok' if whole_ratio >= GOAL_WHOLE_RUN_RATIO else 'MISSED'}")
    print(f"fineweb.py peak RSS: {max(peak_rss):.0f} MB (goal < {GOAL_RSS_MB} MB) "
          f"{'ok' if max(peak_rss) < GOAL_RSS_MB else 'MISSED'}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        run_child(*sys.argv[2:])
    else:
        main()
