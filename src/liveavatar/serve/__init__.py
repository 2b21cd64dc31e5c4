"""``liveavatar serve``: the web page, the jobs API and the live WebSocket session on one loaded engine.

The server's dependencies are the ``ui`` extra (``pip install -e ".[ui]"``); nothing here is imported by
the rest of the engine, and ``command.py`` imports them only when the server starts.
"""
from __future__ import annotations

from importlib.util import find_spec

UI_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "python_multipart",
               "websockets": "websockets", "swagger-ui-bundle": "swagger_ui_bundle"}


def ui_extra_status() -> tuple[bool, str]:
    """(installed, one line for ``liveavatar doctor``)."""
    missing = [name for name, module in UI_PACKAGES.items() if find_spec(module) is None]
    if missing:
        return False, (f"ui extra: missing {', '.join(missing)}; `pip install \"liveavatar[ui]\"` for "
                       f"`liveavatar serve`")
    return True, f"ui extra: installed ({', '.join(UI_PACKAGES)})"
