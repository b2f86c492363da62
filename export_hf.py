"""Export a model as a Hugging Face GPT-2 folder (config.json + model.safetensors), or a GPT-1 model
as an openai-gpt folder (with its vocab.json and merges.txt).

    python export_hf.py log/checkpoints/step_019073 out/my-gpt2
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('out/my-gpt2')"
    python export_hf.py log/storycloze_gpt1/best out/my-gpt1    # OpenAIGPTLMHeadModel.from_pretrained
"""

from __future__ import annotations

from pathlib import Path

from core.cli import StageParser
from core.errors import UserError, exit_on_user_error
from core.hf import export_hf
from core.pretrained import load_model
from core.tokenizer import tokenizer_files


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("model", help="our checkpoint folder, an HF folder, or an HF hub name")
    parser.add_argument("out", type=Path, help="folder to write config.json and model.safetensors into")
    parser.add_argument("--force", action="store_true", help="overwrite files already in OUT")
    args = parser.parse_args()
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out} is a file, not a folder")
    source = Path(args.model)
    if source.exists() and args.out.exists() and source.resolve() in (args.out.resolve(), *args.out.resolve().parents):
        raise UserError(f"{args.out} holds the model being exported ({args.model}): write it to another folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise UserError(f"{args.out} is not empty; pass --force to overwrite")
    model, tokenizer = load_model(args.model)
    if tokenizer.name not in ("gpt2", "openai-gpt"):
        print(f"note: this model uses the {tokenizer.name} tokenizer, recorded in config.json; HF's GPT-2 "
              "tokenizer files do not fit it")
    export_hf(model, args.out, tokenizer)
    written = ", ".join(sorted(["config.json", "model.safetensors", *tokenizer_files(tokenizer)]))
    print(f"wrote {args.out}: {written} ({model.num_params():,} parameters)")


if __name__ == "__main__":
    exit_on_user_error(main)
