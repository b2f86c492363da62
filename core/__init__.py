"""The shared core of the toolkit: what the stage scripts at the top level have in common.

One module per concept.
- Models: `pretrained` (model specs -> files), `weights` (safe tensor files, the key layouts of the
  wild), `checkpoint` (our format), `hf` (Hugging Face interop), `hub` (reaching it), `tokenizer`,
  `gpt1_tokenizer` (GPT-1's BPE), `cross_entropy` (the memory-bounded loss the model uses).
- Data: `documents` (local files and HF datasets as text), `corpus` (tokenizing into shards,
  resumably), `shards` (the token files, written and read), `data` (the training loader), `atomic`
  (crash-safe file writes), `cache` (the cache folder).
- Using a model: `generation` (sampling, KV cache, the compiled decode step), `scoring` (the loss and
  greedy guess of many candidate continuations, packed), `evaluation` (HellaSwag), `core_benchmark`
  (CORE: DCLM's tasks, nanochat's prompts), `matmul` (an opt-in CPU speed-up for inference),
  `attention` (an opt-in CPU speed-up for attention in training).
- Training: `training` (the run's set-up and the one optimizer step), `config` (settings from TOML and
  flags), `optim` (AdamW groups, Muon with AdamW, LR schedules), `muon` (the Muon optimizer), `resume`
  (training checkpoints, RNG states), `runlog` (logs and metrics), `mfu`, `plotting`, `multiple_choice`
  (GPT-1's fine-tuning on Story Cloze and the like).
- Running: `devices` (device and dtype), `distributed` (torchrun), `errors` (one-line user errors),
  `cli` (the stages' command lines: no abbreviations, one-line errors).
The model itself lives in the top-level `model.py`.
"""
