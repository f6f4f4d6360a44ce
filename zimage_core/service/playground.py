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
    from ..scheduler_table import SCHEDULER_NAMES

    cfg: dict = {"wsPath": ws_path, "schedulers": list(SCHEDULER_NAMES), "models": {}, "examplePrompts": []}
    from ..pipeline import MODEL_PRESETS

    presets = MODEL_PRESETS if pipe is None else pipe.presets  # None: the model is still loading
    for model_id, d in presets.items():
        cfg["models"][model_id] = {"steps": d.steps, "CFGScale": d.cfg_scale, "width": d.width, "height": d.height}
    cfg["defaultModel"] = next(iter(presets)) if pipe is None else pipe.default_model
    if pipe is not None:
        cfg["examplePrompts"] = list(getattr(pipe, "meta", {}).get("prompts", []))[:8]
    return cfg


def render(pipe=None, ws_path: str = "/v1") -> str:
    """The page with the configuration block replaced by this server's (``</`` escaped inside the script)."""
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(_CONFIG_OPEN) + len(_CONFIG_OPEN)
    end = text.index("</script>", start)
    blob = json.dumps(page_config(pipe, ws_path)).replace("</", "<\\/")
    return text[:start] + blob + text[end:]
