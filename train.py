"""Pretrain a language model: ``python train.py [group=option ...] [key=value ...]``.

    python train.py                                   # tiny ParaGRU on the bundled corpus (CPU ok)
    python train.py model=paralstm size=400m data=slimpajama deepspeed=zero3
    python train.py experiment=paper_400m_paragru
    torchrun --nproc-per-node 8 train.py ...          # also: the deepspeed launcher and srun (slurm/)

The loop itself is ``pararnn_lm/train.py`` (also ``python -m pararnn_lm.train`` or ``pararnn-train``
once the package is installed); the config groups are ``configs/``.
"""
from pararnn_lm.train import cli

if __name__ == "__main__":
    cli()
