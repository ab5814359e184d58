"""Plotly figures of a study, read through the store's API (no SQL here, no torch, no ONNX Runtime).

Two steps, so that the CLI, the web page and the tests share one reading of the data:

1. :mod:`.data`: :func:`load_study` reads a study through :class:`nas.store.Store` into
   :class:`StudyData`: one :class:`TrialPoint` per trial with every figure it has (objectives, the
   latency spread of its measurement and the measurement's label, the spec's fields) and the
   budgets the study ran under, recovered from the stored constraint values (figure minus budget),
   so a plot shows the budget the study really had even if the profile's YAML has changed since.
   The specs come through a :class:`SpecCache` that the caller owns.
2. :mod:`.figures`: the ``*_figure`` functions turn that value into plotly figures, with
   :mod:`.hypervolume` for the search-efficiency figure; :mod:`.page` puts them on one
   self-contained HTML page (plotly.js embedded, so the file opens offline) and :mod:`.png` draws
   one as a PNG with the system's Chromium.

The names below are the package's surface (``from nas.faces import plots; plots.load_study(...)``);
the modules behind them may be imported directly too.
"""

from nas.faces.plots.data import (
    APPLIES,
    BUDGET_OF,
    FIGURES,
    MIB,
    SHORT,
    SpecCache,
    StudyData,
    TrialPoint,
    load_study,
    thinned,
)
from nas.faces.plots.figures import (
    FEASIBLE_COLOUR,
    FONT,
    FRONT_COLOUR,
    INFEASIBLE_COLOUR,
    STUDY_COLOURS,
    compare_figure,
    default_colour,
    dimensions_figure,
    fmt,
    hover_text,
    hypervolume_figure,
    pareto3d_figure,
    pareto_figure,
    study_figures,
    styled,
)
from nas.faces.plots.hypervolume import hypervolume_2d, hypervolume_history, reference_point
from nas.faces.plots.page import CAPTIONS, PAGE_CSS, page_html, study_facts, write_page
from nas.faces.plots.png import CHROMIUM_FLAGS, CHROMIUM_NAMES, find_chromium, write_png

__all__ = [
    "APPLIES",
    "BUDGET_OF",
    "CAPTIONS",
    "CHROMIUM_FLAGS",
    "CHROMIUM_NAMES",
    "FEASIBLE_COLOUR",
    "FIGURES",
    "FONT",
    "FRONT_COLOUR",
    "INFEASIBLE_COLOUR",
    "MIB",
    "PAGE_CSS",
    "SHORT",
    "STUDY_COLOURS",
    "SpecCache",
    "StudyData",
    "TrialPoint",
    "compare_figure",
    "default_colour",
    "dimensions_figure",
    "find_chromium",
    "fmt",
    "hover_text",
    "hypervolume_2d",
    "hypervolume_figure",
    "hypervolume_history",
    "load_study",
    "page_html",
    "pareto3d_figure",
    "pareto_figure",
    "reference_point",
    "study_facts",
    "study_figures",
    "styled",
    "thinned",
    "write_page",
    "write_png",
]
