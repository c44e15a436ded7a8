"""`python -m daskdl`: the `daskdl` command."""

import sys

from daskdl.cli.main import main

sys.exit(main())
