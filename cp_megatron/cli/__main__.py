"""``python -m cp_megatron.cli ...`` (what torchrun and the deepspeed launcher start)."""

import sys

from cp_megatron.cli import main

sys.exit(main())
