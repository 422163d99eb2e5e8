"""Old import path `fastmae.hub` (released checkpoints by name), kept because users import it: it is `fastmae.weights.hub`."""

import sys

from .weights import hub as _module

sys.modules[__name__] = _module
