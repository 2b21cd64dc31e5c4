"""``liveavatar serve --cluster``: the server as a Ray Serve application, an ingress deployment (the API,
the pages, uploads, the job table: `ingress`, `dispatch`, `relay`) and an engine deployment whose replicas
each own one `Engine` (`replica`), routed by `routing`, configured by `config`; the command line's side
(flags, connecting, deploying) is `liveavatar.cli.serve_cluster`.

Its dependency is the ``cluster`` extra (``ray[serve]``); only that command imports this package's modules.
"""
from __future__ import annotations

from importlib.util import find_spec


def cluster_extra_status() -> tuple[bool, str]:
    """(installed, one line for ``liveavatar doctor`` and for ``serve --cluster`` without it)."""
    if find_spec("ray") is None or find_spec("ray.serve") is None:
        return False, "cluster extra: missing ray[serve]; `pip install \"liveavatar[cluster]\"` for `serve --cluster`"
    return True, "cluster extra: installed (ray[serve])"
