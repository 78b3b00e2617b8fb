"""The REST API: `create_app(settings, controller)`; the controller satisfies `ControllerPort`."""
from trainguard.service.api.app import API_PREFIX, create_app
from trainguard.service.api.ports import ControllerPort

__all__ = ["API_PREFIX", "create_app", "ControllerPort"]
