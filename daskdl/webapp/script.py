"""The dashboard as a Panel app script, shipped inside the package (``app/dashboard.py`` in a
checkout runs it):

    panel serve "$(python -c 'import daskdl.webapp.script as m; print(m.__file__)')" \\
        --address 127.0.0.1 --args [--scheduler ADDR] [--workers N] [--runs-dir DIR]

(``daskdl dashboard`` serves the same app and binds to 127.0.0.1 by itself; with
``panel serve``, pass ``--address 127.0.0.1``, since Bokeh's server otherwise listens on
every interface.) Every browser session gets its own views over one shared client.
"""

from __future__ import annotations

import argparse
import sys


def servable(argv: list[str]) -> None:
    """Parse the script's arguments and make this browser session's app servable."""
    import panel as pn

    from daskdl.webapp.app import App
    from daskdl.webapp.serve import shared_client

    parser = argparse.ArgumentParser(prog="daskdl dashboard app")
    parser.add_argument("--scheduler", help="a running scheduler; default: a local cluster")
    parser.add_argument("--workers", type=int, help="workers of the local cluster")
    parser.add_argument("--runs-dir", default="runs", help="where runs started here write")
    args = parser.parse_args(argv)
    pn.extension("tabulator")
    App(shared_client(args.scheduler, args.workers), runs_dir=args.runs_dir).servable()


if __name__.startswith("bokeh_app"):  # run by `panel serve` as a script
    servable(sys.argv[1:])
