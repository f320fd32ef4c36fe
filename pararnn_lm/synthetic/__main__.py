"""``python -m pararnn_lm.synthetic``: see :mod:`pararnn_lm.synthetic.cli`."""
from pararnn_lm.synthetic.cli import main

if __name__ == "__main__":  # not when a spawned --devices worker imports this module as its __mp_main__
    main()
