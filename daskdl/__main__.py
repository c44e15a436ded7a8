import sys

from daskdl.cli import main

sys.exit(main())
