"""daskdl's dashboard as a Panel app script.

    panel serve app/dashboard.py --address 127.0.0.1 --args [--scheduler ADDR] [--workers N]
        [--runs-dir DIR]

(``daskdl dashboard`` serves the same app and binds to 127.0.0.1 by itself; with
``panel serve``, pass ``--address 127.0.0.1``, since Bokeh's server otherwise listens on
every interface.) Every browser session gets its own views over one shared client.
"""

import argparse
import sys

import panel as pn

from daskdl.webapp.app import App
from daskdl.webapp.serve import shared_client

parser = argparse.ArgumentParser(prog="app/dashboard.py")
parser.add_argument("--scheduler", help="a running scheduler; default: a local cluster")
parser.add_argument("--workers", type=int, help="workers of the local cluster")
parser.add_argument("--runs-dir", default="runs", help="where runs started here write")
args = parser.parse_args(sys.argv[1:])

pn.extension("tabulator")
App(shared_client(args.scheduler, args.workers), runs_dir=args.runs_dir).servable()
