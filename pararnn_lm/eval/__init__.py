"""Evaluation: perplexity, lm-eval integration, the paper's synthetic tasks and table rendering.

Modules (imported lazily; ``import eval`` itself pulls in nothing heavy):
* ``eval.perplexity``     token-weighted perplexity over packed held-out streams, loss by position, plot, CLI
                          (``python -m pararnn_lm.eval.perplexity --model DIR --data FILE``); ``evaluate_batches`` for
                          the training loop's validation.
* ``eval.lm_eval_tasks``  the paper's lm-eval suite (configs/lm_eval/paper.yaml), live-model HFLM
                          wrapper, exported-dir ``hf`` model, batched loglikelihood helpers, CLI.
* ``eval.synthetic``      Table-6 task generators (keep-nth, parity, MQAR, 1-hop, 2-hop), their one-layer models and
                          the names of their result files; the trainer is the app ``python -m pararnn_lm.synthetic``.
* ``eval.tables``         result files -> Table 5 / Table 6 markdown and plots, paper numbers beside ours.
* ``eval.paper``          the paper's published numbers (one place, with the source).
"""
