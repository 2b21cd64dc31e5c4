"""The memory planner: predicts the GPU memory and the speed of a run and picks the fastest placement that
fits the card, before anything is loaded.

``hardware`` describes the card, ``memory`` the bytes of every piece of a run per phase, ``speed`` the time
per forward, and ``policy`` chooses the ``Placement`` (or refuses, with the nearest setting that fits).
"""
