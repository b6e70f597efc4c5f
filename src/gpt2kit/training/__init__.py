"""Fine-tuning (or training from scratch): options (config.py, torch-free for the CLI's --help),
the recipe and its loop (loop.py: finetune), the plan (plan.py), the parts it builds (setup.py), the run folder (runs.py),
the learning-rate schedule, processes (distributed.py), the memory estimate and samples.

Nothing is imported here, so that `gpt2kit.training.config` stays light."""
