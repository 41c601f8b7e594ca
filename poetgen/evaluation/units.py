"""Units of the loss figures, torch-free so that the CLI and the plots can convert without importing torch."""

from __future__ import annotations

import math

LN2 = math.log(2.0)  # nats -> bits: bits per character = nats per character / LN2
