"""Old import path `fastmae.pyramid` (ViTDet's simple feature pyramid), kept because users import it: it is `fastmae.models.pyramid`."""

import sys

from .models import pyramid as _module

sys.modules[__name__] = _module
