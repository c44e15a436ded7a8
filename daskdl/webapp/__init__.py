"""daskdl's Panel dashboard (needs ``pip install "daskdl[app]"``).

``daskdl.dashboard(client)`` (``run=`` or ``study=`` to open on one) shows it in a notebook;
``daskdl dashboard`` and ``panel serve app/dashboard.py`` serve it.

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

    from daskdl.runs.run import Run
    from daskdl.tuning.study import Study
    from daskdl.webapp.app import App


def dashboard(
    client: Client,
    runs_dir: str = "runs",
    study: Study | str | None = None,
    run: Run | str | None = None,
) -> App:
    """The dashboard for ``client``'s cluster, to display in a notebook: every run on the
    cluster, opened on ``run`` (a :class:`daskdl.Run` or its id) or on ``study``'s trials (a
    :class:`daskdl.Study` or its :attr:`~daskdl.Study.key`).

    Examples
    --------
    >>> client = daskdl.local_cluster(n_workers=2)     # doctest: +SKIP
    >>> daskdl.dashboard(client)                       # doctest: +SKIP
    >>> daskdl.dashboard(client, run=run)              # doctest: +SKIP
    >>> daskdl.dashboard(client, study=study)          # doctest: +SKIP
    """
    import panel as pn

    from daskdl.webapp.app import App

    pn.extension("tabulator")
    key = study if study is None or isinstance(study, str) else study.key
    app = App(client, runs_dir, study=key)
    run_id = run if run is None or isinstance(run, str) else run.run_id
    if run_id is not None and run_id in app.store.runs:
        app.store.selected = run_id
    return app
