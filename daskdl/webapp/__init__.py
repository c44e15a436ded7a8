"""daskdl's Panel dashboard (needs ``pip install "daskdl[app]"``).

``daskdl.dashboard(client)`` and ``run.dashboard()`` show it in a notebook; ``daskdl dashboard``
and ``panel serve app/dashboard.py`` serve it.

- :mod:`daskdl.webapp.store`: the runs as their events describe them (no Panel).
- :mod:`daskdl.webapp.views`: curves, workers, status and the run list.
- :mod:`daskdl.webapp.study_state`, :mod:`daskdl.webapp.studies`: tuning studies, their
  trials and plots.
- :mod:`daskdl.webapp.app`: the ``App`` that puts them together with run controls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Panel is an extra: the app is imported when the dashboard is made
    from distributed import Client

    from daskdl.webapp.app import App


def dashboard(client: Client, runs_dir: str = "runs", study: str | None = None) -> App:
    """The dashboard for ``client``'s cluster, to display in a notebook (``study``: a
    :attr:`daskdl.Study.key`, whose trials it shows first).

    Examples
    --------
    >>> client = daskdl.local_cluster(n_workers=2)     # doctest: +SKIP
    >>> daskdl.dashboard(client)                       # doctest: +SKIP
    """
    import panel as pn

    from daskdl.webapp.app import App

    pn.extension("tabulator")
    return App(client, runs_dir, study=study)
