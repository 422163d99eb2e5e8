"""Old import path `fastmae.visualize` (the reconstruction figure and the demo's image helpers), kept because users import it: it is `fastmae.commands.visualize`."""

import sys

from .commands import visualize as _module

sys.modules[__name__] = _module
