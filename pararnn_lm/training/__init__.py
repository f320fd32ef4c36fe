"""What the training loop (``pararnn_lm/train.py``) composes, one concern per module:

* ``config``       the typed Hydra schema of a run, and the checks a schema cannot express
* ``distributed``  rank, device and process group under any launcher; collectives; per-rank logging
* ``build``        the rank's data, the model, activation checkpointing, compiled blocks, grad accumulation
* ``optim``        AdamW parameter groups and the warm-up + cosine schedule
* ``backends``     how a step runs: plain PyTorch (DDP) or DeepSpeed ZeRO
* ``checkpoint``   atomic, verified checkpoints (sizes and checksums; nothing unpickled), RNG state
* ``run_folder``   one run per folder: the lock, refusing to overwrite a run, what may change on resume
* ``init_from``    continued pretraining: a new run from the weights of a checkpoint or an HF export
* ``metrics``      FLOPs per token, MFU, step time, memory and Newton statistics; metrics.jsonl, W&B, TensorBoard
* ``profiling``    torch.profiler traces and CUDA memory snapshots of chosen steps
* ``evaluation``   validation loss during training
* ``export``       the trained model as a Hugging Face directory
* ``signals``      preemption (SLURM signals, the PREEMPT sentinel) and Ctrl-C
* ``progress``     the progress bar
* ``faults``       fault injection for the crash-safety tests (``PARARNN_TEST_FAULT``)
"""
