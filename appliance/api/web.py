"""The on-prem web UI: one page, served from the package, no CDN, no build step."""

from __future__ import annotations

from flask import Blueprint, render_template

from appliance import __version__
from appliance.state import state

bp = Blueprint("web", __name__)


@bp.get("/")
def index():
    return render_template("index.html", model=state().models.default.name, version=__version__)
