"""The ``nas`` command line: ``main`` builds the app; the other modules register commands on it."""
