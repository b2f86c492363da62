"""The shared core of the toolkit: what the stage scripts at the top level have in common.

One module per concept: `pretrained` (model specs), `hf` (Hugging Face interop), `checkpoint`,
`tokenizer`, `shards` (token files), `atomic` (crash-safe file writes), `hub`, `generation`, `evaluation` (HellaSwag), `devices`,
`distributed` and `errors`. The model itself lives in the top-level `model.py`.
"""
