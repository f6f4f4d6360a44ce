"""The playground page served at ``GET /``: one static HTML+JS file (``static/playground.html``) that speaks the
WebSocket protocol of ``/v1`` itself. The server only fills in its configuration block (models with their defaults,
scheduler names, example prompts), so the file needs no build step and also opens as a plain file.
"""

from __future__ import annotations

import json
from pathlib import Path

PAGE = Path(__file__).with_name("static") / "playground.html"
_CONFIG_OPEN = '<script id="zimage-config" type="application/json">'


def page_config(pipe=None, ws_path: str = "/v1") -> dict:
    """What the page's form offers: the pipeline's model ids with their defaults, the API's scheduler names."""
    from ..service.engine import model_menu

    return {"wsPath": ws_path, **model_menu(pipe)}  # pipe None: the model is still loading


def render(pipe=None, ws_path: str = "/v1") -> str:
    """The page with the configuration block replaced by this server's (``</`` escaped inside the script)."""
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(_CONFIG_OPEN) + len(_CONFIG_OPEN)
    end = text.index("</script>", start)
    blob = json.dumps(page_config(pipe, ws_path)).replace("</", "<\\/")
    return text[:start] + blob + text[end:]
