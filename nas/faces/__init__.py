"""Faces: what a person uses. The CLI (``cli``), the web page (``web``) and the plots (``plots``).

They read results through the store's API and start work through the search, the stages or the
winner; they hold no SQL and no training code of their own. May import every layer.
"""
