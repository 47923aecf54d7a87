"""nbval runs every notebook here top to bottom at its reader's sizes, except the ones
``tests/test_notebooks.py`` runs through papermill at test sizes (the same cells, fewer
rounds and phones, the shared Ray head): running them here too would only repeat them."""

collect_ignore = [
    "03-non-iid-and-stragglers.ipynb",
    "04-simulation-engine.ipynb",
    "05-transfer-learning.ipynb",
]
