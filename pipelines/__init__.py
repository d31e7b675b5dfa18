"""YAML pipelines: load, match, apply rules, run plugin steps off the ingest path.

``pipelines.service.setup`` is the collector feature; ``pipelines.cli`` holds
``pipelines check`` and ``pipelines test``.
"""
