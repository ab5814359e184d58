"""The winner of a study: picked from the store, written as a folder, and trained fully.

``pick`` chooses the trial (by number, the knee of the front, or the best under a latency);
``recipe`` plans its full training from the brief one; ``folder`` writes the export folder and
reads it back; ``readme`` renders the folder's README from ``templates/``; ``fulltrain`` trains
it (``nas train``). ``errors`` holds the error they share.

May import: ``nas.spec``, ``nas.stages``, ``nas.store`` and ``nas.winner``; not the search or a face.
"""
