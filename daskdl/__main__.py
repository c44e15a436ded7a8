import sys

from daskdl.cli.main import main

sys.exit(main())
