"""ParaRNN-LM: nonlinear recurrent language models trained in parallel over the sequence.

Subpackages, lowest layer first (imports only point down this list; ``data`` and ``eval`` sit beside):

* ``pararnn_lm.kernels``   the parallel-RNN engine (``Cell``, ``NewtonConfig``, ``parallel_rnn``), Triton kernels
* ``pararnn_lm.models``    the HF-native causal LM, its mixers, presets and export
* ``pararnn_lm.data``      corpora, tokenizers, packed resumable token streams
* ``pararnn_lm.eval``      perplexity, lm-eval, the paper's synthetic tasks and tables
* ``pararnn_lm.training``  typed configs, backends, checkpoints, metrics

Apps on top: ``pararnn_lm.train`` (the training loop) and ``pararnn_lm.synthetic`` (the trainer of the
paper's synthetic tasks).

Importing the package imports none of them (``import pararnn_lm`` stays cheap).
"""
from .provenance import __version__

__all__ = ["__version__"]
