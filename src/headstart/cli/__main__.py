"""`python -m headstart.cli ...` (and `accelerate launch -m headstart.cli ...`) run the `headstart` command."""
import sys

from . import main

sys.exit(main())
