"""`python -m tritllm_ext ...` is the `tritllm` command."""
import sys

from .cli import main

sys.exit(main())
