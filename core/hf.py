"""Hugging Face GPT-2 and GPT-1 interop: config mapping, weight layout, hub download, folder import and export.

An HF GPT-2 folder is `config.json` plus weights in `model.safetensors` (or `pytorch_model.bin`,
either possibly sharded with an `*.index.json`). HF keeps its projections in `Conv1D`, whose weight
is the transpose of an `nn.Linear` weight; everything else maps one to one.

An HF GPT-1 folder (`model_type` "openai-gpt") is laid out the same way, with GPT-1's embeddings
named `tokens_embed` and `positions_embed` instead of `wte` and `wpe`, no final LayerNorm, and its
tokenizer's vocab.json and merges.txt beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core import gpt1_tokenizer
from core.errors import UserError, first_line
from core.hub import require_hub_reachable
from core.tokenizer import Tokenizer, added_tokens, get_tokenizer, tokenizer_files, tokenizer_name
from core.weights import our_layout, read_tensor_file, write_tensor_file
from model import GPT, GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF configs have no field for a tiktoken encoding: we add this key on export, and a folder without
# it is an ordinary HF GPT-2, whose tokenizer is GPT-2's BPE.
TOKENIZER_KEY = "gpt2_toolkit_tokenizer"
ADDED_TOKENS_KEY = "gpt2_toolkit_added_tokens"  # names of the tokens after the tokenizer's vocabulary
DEFAULT_TOKENIZER = "gpt2"
GPT1_MODEL_TYPE = "openai-gpt"
HUB_ALIASES = {name: f"openai-community/{name}"
               for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", GPT1_MODEL_TYPE)}
# GPT-1's names for the embeddings that GPT-2 (and we) call wte and wpe.
GPT1_NAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}
# Weight files in the order we look for them: safetensors first (no pickle), then pickles.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# HF config values that change the math, with the only value we implement.
REQUIRED_SETTINGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# HF activation names, by the GELU that they compute: gelu_new and gelu_pytorch_tanh are the tanh
# approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), gelu is the exact 0.5x(1 + erf(x/sqrt(2))).
GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}


def config_from_hf(hf_config: dict) -> GPTConfig:
    """Our config for an HF `GPT2Config` or `OpenAIGPTConfig` dict; refuses settings that would change the math."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type not in ("gpt2", GPT1_MODEL_TYPE):
        raise UserError(f"model_type {model_type!r} is neither GPT-2 nor GPT-1 ({GPT1_MODEL_TYPE})")
    if model_type == GPT1_MODEL_TYPE:
        # HF's OpenAIGPT maps afn "gelu" to gelu_new, the tanh approximation that OpenAI's GPT-1 code
        # used; its MLP is always 4 x n_embd wide, and it has no final LayerNorm.
        if hf_config.get("afn", "gelu") != "gelu":
            raise UserError(f"afn {hf_config['afn']!r} is not supported (only 'gelu')")
        shape = dict(post_ln=True, final_ln=False, gelu="tanh")
    else:
        activation = hf_config.get("activation_function", "gelu_new")
        if activation not in GELUS:
            raise UserError(f"activation_function {activation!r} is not supported (only {', '.join(GELUS)})")
        shape = dict(n_inner=hf_config.get("n_inner"), gelu=GELUS[activation])
    for key, value in REQUIRED_SETTINGS.items():
        if hf_config.get(key, value) != value:
            raise UserError(f"{key}={hf_config[key]!r} is not supported (only {value!r})")
    dropouts = {hf_config.get(key, 0.1) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        raise UserError(f"resid_pdrop, embd_pdrop and attn_pdrop differ ({sorted(dropouts)}): "
                        "this model has a single dropout rate")
    try:
        return GPTConfig(
            block_size=hf_config["n_positions"],
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["n_layer"],
            n_head=hf_config["n_head"],
            n_embd=hf_config["n_embd"],
            dropout=dropouts.pop(),
            layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
            **shape,
        )
    except KeyError as missing:
        raise UserError(f"HF config lacks {missing}") from None


def is_gpt1(config: GPTConfig) -> bool:
    """Whether `config` is GPT-1's shape, exported as HF's openai-gpt; refuses mixes that neither HF
    GPT-2 nor HF GPT-1 can hold (post-LN with a final LayerNorm, say)."""
    gpt1 = (config.post_ln, config.final_ln, config.gelu, config.mlp_width) == (True, False, "tanh", 4 * config.n_embd)
    gpt2 = not config.post_ln and config.final_ln
    if not gpt1 and not gpt2:
        raise UserError(f"no HF model class has this shape (post_ln={config.post_ln}, final_ln={config.final_ln}, "
                        f"gelu={config.gelu!r}, MLP width {config.mlp_width}): GPT-2 is pre-LN with a final "
                        "LayerNorm, GPT-1 post-LN without one, with the tanh GELU and a 4 x n_embd MLP")
    return gpt1


def config_to_hf(config: GPTConfig, tokenizer: str | Tokenizer = DEFAULT_TOKENIZER) -> dict:
    """An HF `config.json` dict for our config (padded vocab rows are not exported): GPT-1's shape as
    `OpenAIGPTLMHeadModel`, anything else as `GPT2LMHeadModel`."""
    name = tokenizer_name(tokenizer)
    common = {
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        TOKENIZER_KEY: name,
    }
    if not isinstance(tokenizer, str) and added_tokens(tokenizer):
        common[ADDED_TOKENS_KEY] = added_tokens(tokenizer)
    if is_gpt1(config):
        return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": GPT1_MODEL_TYPE, "afn": "gelu", **common}
    eot = (get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer).eot_token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_ctx": config.block_size,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "scale_attn_weights": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        **common,
    }


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys and Conv1D layout (GPT-2's or GPT-1's, in any of the layouts of core/weights.py) -> our
    keys and nn.Linear layout."""
    renamed = {}
    for key, value in hf_state_dict.items():
        for gpt1_name, name in GPT1_NAMES.items():
            if key.startswith((gpt1_name, "transformer." + gpt1_name)):
                key = key.replace(gpt1_name, name, 1)
        renamed[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    return our_layout(renamed)


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights as `GPT2LMHeadModel.save_pretrained` (or OpenAIGPTLMHeadModel's, for GPT-1's shape)
    writes them: Conv1D layout, no padded vocab rows, no `lm_head.weight` (tied, so HF re-ties it on load)."""
    renames = {name: gpt1_name for gpt1_name, name in GPT1_NAMES.items()} if is_gpt1(model.config) else {}
    hf = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        elif key == "transformer.wte.weight":
            value = value[: model.config.vocab_size]
        for name, gpt1_name in renames.items():
            key = key.replace("transformer." + name, "transformer." + gpt1_name, 1)
        hf[key] = value.detach().contiguous().cpu()
    return hf


def read_hf_folder(folder: Path | str) -> tuple[GPTConfig, dict[str, torch.Tensor], str, list[str]]:
    """An HF GPT-2 or GPT-1 folder (config.json + weights) as our model config, its weights in our
    layout, its tokenizer's name and the names of the tokens added after that tokenizer's vocabulary."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {config_path}: {error}") from None
    config = config_from_hf(hf_config)
    try:
        weights = state_dict_from_hf(read_weights(folder))
    except UserError as error:
        raise UserError(f"{folder}: {error}") from None
    default = gpt1_tokenizer.NAME if hf_config.get("model_type") == GPT1_MODEL_TYPE else DEFAULT_TOKENIZER
    added = hf_config.get(ADDED_TOKENS_KEY, [])
    if not isinstance(added, list) or not all(isinstance(token, str) for token in added):
        raise UserError(f"{config_path}: {ADDED_TOKENS_KEY} must be a list of token names")
    return config, weights, hf_config.get(TOKENIZER_KEY, default), added


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder's weight files, sharded or not, preferring safetensors."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        paths = [folder / shard for shard in shard_names(path)] if name.endswith(".index.json") else [path]
        state_dict = {}
        for shard in paths:
            state_dict.update(read_tensor_file(shard))
        return state_dict
    raise UserError(f"{folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def shard_names(index_path: Path) -> list[str]:
    """The weight files that a sharded checkpoint's `*.index.json` lists."""
    try:
        return sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
        raise UserError(f"cannot read the shard index {index_path}: {first_line(error)}") from None


def export_hf(model: GPT, folder: Path | str, tokenizer: str | Tokenizer = DEFAULT_TOKENIZER) -> Path:
    """Write `model` as an HF folder that `GPT2LMHeadModel.from_pretrained(folder)` (GPT-1:
    `OpenAIGPTLMHeadModel`) loads; the tokenizer's name and added tokens are kept in config.json so
    that `read_hf_folder` pairs them again, and GPT-1's tokenizer files are written beside."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tensor_file(state_dict_to_hf(model), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config, tokenizer), indent=2) + "\n")
    if not isinstance(tokenizer, str):
        for name, data in tokenizer_files(tokenizer).items():
            (folder / name).write_bytes(data)
    return folder


def download_hf_model(name: str) -> Path:
    """The local folder of a hub model's config.json and weights: from the HF cache when there,
    else downloaded (safetensors when the repo has them, else its pickles)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = HUB_ALIASES.get(name, name)
    # vocab.json and merges.txt are GPT-1's tokenizer (for GPT-2 they are a copy of what tiktoken has).
    safetensors_only = ["config.json", "*.safetensors", "*.safetensors.index.json", "vocab.json", "merges.txt"]
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=safetensors_only, local_files_only=True))
        if _has_weights(cached):  # the cache may hold just config.json, fetched by another program
            return cached
    except LocalEntryNotFoundError:
        pass
    require_hub_reachable(repr(repo_id), advice=(
        "Offline, pass a local folder instead: an HF folder with config.json and model.safetensors "
        "(as written by save_pretrained or export_hf.py), or one of our checkpoints."))
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=safetensors_only))
        if not _has_weights(folder):  # an old repo with pickles only
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin*", "vocab.json",
                                                                     "merges.txt"]))
    except Exception as error:
        raise UserError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {first_line(error)}") from None
    return folder


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)
