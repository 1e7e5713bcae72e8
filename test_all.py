"""
test_all.py: executable documentation for every stage, in pipeline order.

Run with `python -m pytest -q test_all.py` (or `python test_all.py`).
Reference tests read the authors' recorded tensors from $I2P_REFERENCE_DIR
(default ../shared/reference) and take every size from the files' config.
"""
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.environ.get('I2P_REFERENCE_DIR', os.path.join(HERE, '..', 'shared', 'reference'))


# ---------------------------------------------------------------- core stages


# ---------------------------------------------------------------- data.py


# ---------------------------------------------------------------- entry scripts


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
