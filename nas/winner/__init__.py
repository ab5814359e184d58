"""The winner of a study: picked from the store, written as a folder, and trained fully.

May import: ``nas.spec``, ``nas.stages``, ``nas.store`` and ``nas.winner``; not the search or a face.
"""
