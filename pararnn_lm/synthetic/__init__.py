"""The synthetic-task trainer (paper Table 6): one-layer Transformer, Mamba2, ParaGRU and ParaLSTM on keep-nth,
parity, MQAR, 1-hop and 2-hop, run as ``python -m pararnn_lm.synthetic`` (``--help``; README.md beside this file).

One concern per module:

* ``config``   :class:`SyntheticTrainConfig` (defaults = the paper's recipe), YAML files, curricula, sweeps
* ``run``      one seed's run: model, AdamW, cosine schedule, validation and test, resumable state files
* ``devices``  runs advanced round-robin in one process (CUDA streams), one worker process per device
* ``grid``     cells, the architectures x tasks grid, sweeps; the result files
* ``cli``      the command line

The task generators are :mod:`pararnn_lm.eval.synthetic.tasks`, the models
:mod:`pararnn_lm.eval.synthetic.models`, the result files' names :mod:`pararnn_lm.eval.synthetic.results`
and the tables and plots :mod:`pararnn_lm.eval.tables`.
"""
