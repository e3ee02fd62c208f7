"""HTTP serving: a native job API, an AUTOMATIC1111-compatible surface and a web page (`stablexl serve`)."""

from .app import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
