"""Generate text from any model spec, streaming it to the terminal.

    python sample.py "Hello, I'm a language model,"            # 5 samples of 30 new tokens from gpt2
    python sample.py -m log/checkpoints/step_019073 --top-p 0.9 "Once upon a time"
    echo "The meaning of life is" | python sample.py --json --greedy
    python sample.py --interactive                             # a prompt loop; Ctrl-D quits

With several samples, the batch is generated at once: the first sample streams as its tokens
arrive, the others are printed when the batch is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from core.cli import StageParser
from core.cpu_speedups import speed_up_generation
from core.devices import dtype_name, enable_tf32, resolve_device, resolve_dtype
from core.errors import UserError, exit_on_user_error
from core.generation import Sampling, TextStream, compile_decode_step, fit_to_context, stream_tokens
from core.pretrained import add_model_arguments, load_model
from core.tokenizer import Tokenizer
from model import GPT


def parse_args() -> argparse.Namespace:
    parser = StageParser(__doc__)
    parser.add_argument("prompt", nargs="?", help="the prompt (default: --prompt-file, else stdin when piped, "
                                                  "else unconditional from <|endoftext|>)")
    add_model_arguments(parser, cpu_bfloat16=True)
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    parser.add_argument("-n", "--num-samples", type=int, help="samples per prompt (default: 5; 1 with --interactive "
                                                              "or --greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate per sample (default: 30)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 disables "
                                                              "(default: 50, as build-nanogpt)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens reaching "
                                                    "probability p")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives the same samples")
    parser.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|>")
    parser.add_argument("--json", action="store_true", help="print the samples as one JSON object instead")
    parser.add_argument("--interactive", action="store_true", help="prompt loop with line editing and history")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="decode with a torch.compile'd step over a static KV cache, compiled before the "
                             "timing starts (default: on for CUDA, off on the CPU, where it gains little for its "
                             "compile time; docs/benchmarks.md gives figures)")
    args = parser.parse_args()
    if args.num_samples is None:  # greedy samples would all be the same
        args.num_samples = 1 if args.interactive or args.greedy else 5
    if args.num_samples < 1 or args.max_new_tokens < 0:
        parser.error("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if args.interactive and (args.json or args.prompt or args.prompt_file):
        parser.error("--interactive reads its prompts itself: drop --json, the prompt and --prompt-file")
    return args


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot read --prompt-file: {error}") from None
        except UnicodeDecodeError as error:
            raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({error.reason} at byte "
                            f"{error.start})") from None
    else:
        text = "" if sys.stdin.isatty() else sys.stdin.read()
    # The line break that ends a file or `echo`'s output is not part of the prompt: left in, the
    # model would start a new line or paragraph.
    return text.removesuffix("\n")


def encode_prompt(text: str, tokenizer: Tokenizer, model: GPT) -> list[int]:
    """Prompt ids; an empty prompt becomes <|endoftext|>, the token that starts every document.
    GPT-1 has no such token, nor any token for whitespace: its prompts must hold a word."""
    ids = tokenizer.encode_ordinary(text) if text or tokenizer.eot_token is None else [tokenizer.eot_token]
    if not ids:
        raise UserError(f"the {tokenizer.name} tokenizer has no <|endoftext|> token to start from and the prompt "
                        f"{text!r} has no tokens: give a prompt")
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt has token id {max(ids)}, beyond this model's vocabulary of "
                        f"{model.config.vocab_size}")
    return ids


def run_prompt(text: str, model: GPT, tokenizer: Tokenizer, sampling: Sampling, args: argparse.Namespace,
               generator: torch.Generator) -> None:
    """Generate for one prompt and print the samples, streaming the first."""
    prompt, max_new_tokens = fit_to_context(encode_prompt(text, tokenizer, model), args.max_new_tokens,
                                            model.config.block_size)
    stop_token = tokenizer.eot_token if args.stop_at_eot else None
    if args.compile:
        seconds = compile_decode_step(model, args.num_samples, len(prompt), max_new_tokens)
        print(f"[decode step compiled in {seconds:.1f}s, not counted in the tokens/s]", file=sys.stderr)
    steps = stream_tokens(model, prompt, args.num_samples, max_new_tokens, sampling, generator, stop_token,
                          compiled=args.compile)
    rows: list[list[int]] = [[] for _ in range(args.num_samples)]  # new tokens, stop token excluded
    finished = [False] * args.num_samples
    stream = None if args.json else TextStream(tokenizer.decode_single_token_bytes)
    if stream is not None and not args.interactive:  # interactively, the prompt is on screen already
        print("> " + tokenizer.decode(prompt), end="", flush=True)
    start = time.perf_counter()
    for tokens in steps:
        for i, token in enumerate(tokens.tolist()):
            if finished[i] or token == stop_token:
                finished[i] = True
                continue
            rows[i].append(token)
            if i == 0 and stream is not None:
                print(stream.push(token), end="", flush=True)
    elapsed = time.perf_counter() - start
    if args.json:
        samples = [{"text": tokenizer.decode(row), "tokens": row} for row in rows]
        print(json.dumps({"model": args.model, "device": str(model.device), "dtype": dtype_name(model.dtype),
                          "prompt": tokenizer.decode(prompt), "prompt_tokens": prompt, "samples": samples},
                         ensure_ascii=False))
        return
    print(stream.flush())
    for row in rows[1:]:
        print("> " + tokenizer.decode(prompt + row))
    new_tokens = sum(len(row) for row in rows)
    print(f"[{new_tokens} new tokens in {elapsed:.2f}s: {new_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{dtype_name(model.dtype)} on {model.device}]", file=sys.stderr)


def interactive(model: GPT, tokenizer: Tokenizer, sampling: Sampling, args: argparse.Namespace,
                generator: torch.Generator) -> None:
    """Read prompts until EOF (Ctrl-D), with readline's line editing and history when on a terminal.
    Ctrl-C interrupts the answer being generated."""
    with contextlib.suppress(ImportError):  # absent on Windows
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    print(f"{args.model}: type a prompt, Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not text.strip():
            continue
        try:
            run_prompt(text, model, tokenizer, sampling, args, generator)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print("\n[interrupted]", file=sys.stderr)
        except UserError as error:  # a prompt this model cannot take ends that prompt, not the session
            print(f"error: {error}", file=sys.stderr)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    enable_tf32(device)
    dtype = resolve_dtype(args.dtype, device, cpu_bfloat16=True)
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                            greedy=args.greedy)
    except ValueError as error:
        raise UserError(str(error)) from None
    text = None if args.interactive else read_prompt(args)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    speed_up_generation(model)  # on a CPU only: core/cpu_speedups.py
    if args.stop_at_eot and tokenizer.eot_token is None:
        raise UserError(f"--stop-at-eot: the {tokenizer.name} tokenizer has no <|endoftext|> token")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.compile is None:
        args.compile = device.type == "cuda" and sys.platform != "win32"
    elif args.compile and sys.platform == "win32":
        raise UserError("--compile: torch.compile does not support Windows")
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
    if args.interactive:
        interactive(model, tokenizer, sampling, args, generator)
    else:
        run_prompt(text, model, tokenizer, sampling, args, generator)


if __name__ == "__main__":
    exit_on_user_error(main)
