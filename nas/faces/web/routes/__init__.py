"""The page's routes, one module per resource: the studies (``/``, ``/study/NAME``), a trial
(``/study/NAME/trial/N``), studies side by side (``/compare``), the JSON the page polls and a
script reads (``/api/...``), and the assets (plotly.js, the favicon). Each module's ``router`` is
included by :func:`nas.faces.web.app.create_app`, in the order of :data:`ROUTERS`."""

from nas.faces.web.routes import api, assets, compare, studies, trials

ROUTERS = (studies.router, trials.router, compare.router, api.router, assets.router)
