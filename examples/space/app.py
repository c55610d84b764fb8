"""Hugging Face Space entry point for m2ist's grounding page (copy this folder into a Gradio Space).

Set the adapter with the Space variable ``M2IST_ADAPTER`` (a Hub repo id such as ``your-name/m2ist-refcoco``, or
several separated by commas, each optionally ``NAME=REPO``). The towers are re-loaded by the names recorded in
the adapter's config. ``M2IST_EXAMPLES=shapes`` adds the demo's procedural scenes as examples.
"""

from __future__ import annotations

import os

from m2ist.app import build_app, demo_examples, load_models, serve

ADAPTERS = [spec.strip() for spec in os.environ.get("M2IST_ADAPTER", "").split(",") if spec.strip()]
if not ADAPTERS:
    raise SystemExit("Set the Space variable M2IST_ADAPTER to an adapter repo id, e.g. your-name/m2ist-refcoco.")
MODELS = load_models(ADAPTERS)
EXAMPLES = demo_examples() if os.environ.get("M2IST_EXAMPLES") == "shapes" else None

#: The page, for tools that look for a module-level ``demo`` (and for tests: importing this file launches nothing).
demo = build_app(MODELS, EXAMPLES)

if __name__ == "__main__":
    # a Space sets GRADIO_SERVER_NAME/GRADIO_SERVER_PORT; host/port None let gradio read them
    serve(MODELS, host=None, port=None, app=demo)
