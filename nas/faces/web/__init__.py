"""``nas ui``: a read-only web page over the results database (FastAPI, Jinja2 templates).

:func:`nas.faces.web.app.create_app` makes the app; the routes are in ``routes/``, one module per
resource, the templates in ``templates/``.
"""
