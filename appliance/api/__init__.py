"""HTTP endpoints, one blueprint per resource."""

from flask import Flask

from appliance.api import admin, embeddings, health, openai, openapi, web


def init_app(app: Flask) -> None:
    app.register_blueprint(health.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(embeddings.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(openapi.bp)
