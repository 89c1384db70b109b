#!/usr/bin/env python
"""Same verbs as the ``xmodal`` console script: ``python train.py pretrain --config configs/pretrain.yaml key=value``."""
import sys

from xmodal.cli import main

if __name__ == "__main__":
    sys.exit(main())
