"""``nas ui``: a read-only web page over the results database (FastAPI, Jinja2 templates)."""
