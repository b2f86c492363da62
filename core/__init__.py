"""The shared core of the toolkit: what the stage scripts at the top level have in common.

One module per concept.
- Models: `pretrained` (`load_model(spec)`, the one way every stage loads a model), `weights` (safe
  tensor files, the key layouts of the wild), `checkpoint` (our format), `hf` (Hugging Face interop),
  `hub` (reaching it), `tokenizer`, `gpt1_tokenizer` (GPT-1's BPE), `cross_entropy` (the memory-bounded
  loss the model uses).
- Data: `documents` (local files and HF datasets as text), `corpus` (tokenizing into shards,
  resumably), `shards` (the token files, written and read), `data` (the training loader), `atomic`
  (crash-safe file writes), `cache` (the cache folder).
- Using a model: `generation` (sampling, KV cache, the compiled decode step), `scoring` (the loss and
  greedy guess of many candidate continuations, packed), `hellaswag` (HellaSwag), `core_benchmark`
  (CORE: DCLM's tasks, nanochat's prompts), `cpu_speedups` (the CPU-only speed-ups, a stage's one call
  each: malloc keeping freed memory in the trainers, kept oneDNN weight copies in sample.py).
- Training: `training` (the run's set-up, checkpoints and resume; each trainer writes its own step),
  `config` (settings from TOML and flags), `optim` (AdamW groups, Muon with AdamW), `muon` (the Muon
  optimizer), `resume` (training checkpoints, RNG states), `runlog` (logs and metrics), `mfu`,
  `plotting`, `multiple_choice` (GPT-1's fine-tuning on Story Cloze and the like).
- Running: `devices` (device and dtype), `distributed` (torchrun), `errors` (one-line user errors),
  `cli` (the stages' command lines: no abbreviations, one-line errors).
The model itself lives in the top-level `model.py`.
"""
