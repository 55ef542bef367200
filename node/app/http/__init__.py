"""The node's HTTP side, one job per module.

:mod:`~node.app.http.server`
    The listener and its routes (:class:`~node.app.http.server.StatusServer`).
:mod:`~node.app.http.pages`
    The HTML pages, from the Jinja2 templates in ``templates/`` (autoescaped).
:mod:`~node.app.http.thumbnails`
    The before/after thumbnails, rendered on demand and cached on disk.
"""
