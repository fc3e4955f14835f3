"""``mlipops ui``'s MLflow server: MLflow's own app plus one page that opens an experiment's runs the way a
potential is judged.

MLflow 3's UI keeps the runs table's columns in the browser (``localStorage``, per experiment) and starts every
experiment with Source, Models and Dataset only: no metric column, and no server setting changes that. The page
``/mlipops/runs/<experiment_id>`` (the URL ``mlipops ui`` prints) adds the headline metrics
(:mod:`mlipops.headline`) to that experiment's columns when the browser holds no column choice of the user's (the
default three), keeps a user's own choice, marks MLflow's assistant panel as already shown (it opens over a third
of the window on a browser's first visit), makes the model-training view the browser's workflow (so run and
model-version pages opened later show its sidebar, not GenAI's traces and judges), and redirects to the runs in
MLflow's model-training view. It is an
MLflow app plugin (entry point ``mlflow.app: mlipops``, as MLflow's own ``basic-auth``): ``mlflow ui --app-name
mlipops``.
"""

from __future__ import annotations

import json

from mlipops.headline import HEADLINE

DEFAULT_COLUMNS = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]  # MLflow 3.17's default
ASSISTANT_SEEN = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"  # MLflow 3.17: the assistant was auto-opened once
STATE_KEY = 'MLflowLocalStorage-1.1-ExperimentPage-["{id}"]-ReactComponentState'  # MLflow 3.17's storage key
# MLflow 3.17: the workflow a page opens in when its URL names none (run and model-version pages, the sidebar);
# GenAI (traces, judges, prompts) by default
WORKFLOW_KEY = "mlflow.workflowType_v1"


def columns() -> list[str]:
    """The runs table's columns: MLflow's default attributes, then the headline metrics in their order."""
    return DEFAULT_COLUMNS + [f"metrics.`{h.name}`" for h in HEADLINE]


def open_runs_page(experiment_id: str) -> str:
    """The HTML of ``/mlipops/runs/<experiment_id>`` (see the module doc)."""
    if not experiment_id.isdigit():
        raise ValueError(f"experiment id must be a number (got {experiment_id!r})")
    key = STATE_KEY.format(id=experiment_id)
    target = f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mlipops: runs</title></head><body>
<p>Opening the runs of experiment {experiment_id} with the headline metrics as columns:
<a href="{target}">{target}</a></p>
<script>
(function () {{
  var ASSISTANT = {json.dumps(ASSISTANT_SEEN)};
  var key = {json.dumps(key)}, defaults = {json.dumps(DEFAULT_COLUMNS)}, wanted = {json.dumps(columns())};
  var state = null;
  try {{ state = JSON.parse(window.localStorage.getItem(key)); }} catch (e) {{ state = null; }}
  if (!state || typeof state !== "object") {{ state = {{}}; }}
  var mine = state.selectedColumns;
  var untouched = !Array.isArray(mine) || (mine.length === defaults.length
                  && mine.every(function (c) {{ return defaults.indexOf(c) >= 0; }}));
  if (untouched) {{ state.selectedColumns = wanted; window.localStorage.setItem(key, JSON.stringify(state)); }}
  // MLflow 3.17 opens its assistant panel (a third of the window) on a browser's first visit: not over the runs
  if (window.localStorage.getItem(ASSISTANT) === null) {{ window.localStorage.setItem(ASSISTANT, "true"); }}
  // this page opens the model-training view: so do the run and model-version pages linked from it afterwards
  window.localStorage.setItem({json.dumps(WORKFLOW_KEY)}, JSON.stringify("machine_learning"));
  window.location.replace({json.dumps(target)});
}})();
</script></body></html>"""


def create_app():
    """MLflow's FastAPI server over its Flask app, with the page above (the ``mlflow.app`` entry point)."""
    from flask import Response
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    if "mlipops_open_runs" not in flask_app.view_functions:
        def mlipops_open_runs(experiment_id: str):
            try:
                return Response(open_runs_page(experiment_id), mimetype="text/html")
            except ValueError as exc:
                return Response(str(exc), status=404, mimetype="text/plain")

        flask_app.add_url_rule("/mlipops/runs/<experiment_id>", "mlipops_open_runs", mlipops_open_runs)
    return create_fastapi_app(flask_app)
