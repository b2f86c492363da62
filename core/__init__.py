"""The shared core of the toolkit: what the stage scripts at the top level have in common.

One module per concept. Models: `pretrained` (model specs), `hf` (Hugging Face interop),
`checkpoint`, `tokenizer`. Data: `shards` (token files), `atomic` (crash-safe file writes), `hub`.
Using a model: `generation`, `evaluation` (HellaSwag). Training: `config` (settings from TOML and
flags), `data` (the shard loader), `optim` (AdamW groups, LR schedule), `mfu`, `runlog` (logs and
metrics), `resume` (training checkpoints), `plotting`. Running: `devices`, `distributed`, `errors`.
The model itself lives in the top-level `model.py`.
"""
