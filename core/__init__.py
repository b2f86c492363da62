"""The shared core of the toolkit: what the stage scripts at the top level have in common.

One module per concept. Models: `pretrained` (model specs), `hf` (Hugging Face interop),
`checkpoint`, `tokenizer`, `gpt1_tokenizer` (GPT-1's BPE). Data: `shards` (token files), `atomic`
(crash-safe file writes), `hub`. Using a model: `generation`, `evaluation` (HellaSwag). Training:
`config` (settings from TOML and flags), `data` (the shard loader), `optim` (AdamW groups, LR
schedules), `mfu`, `runlog` (logs and metrics), `resume` (training checkpoints), `plotting`,
`multiple_choice` (GPT-1's fine-tuning on Story Cloze and the like). Running: `devices`,
`distributed`, `errors`.
The model itself lives in the top-level `model.py`.
"""
