"""daskdl's dashboard as a Panel app script (the app itself is ``daskdl/webapp/script.py``,
shipped in the package).

    panel serve app/dashboard.py --address 127.0.0.1 --args [--scheduler ADDR] [--workers N]
        [--runs-dir DIR]
"""

import sys

from daskdl.webapp.script import servable

servable(sys.argv[1:])
