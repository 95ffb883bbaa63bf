"""Recipes: how this project builds its own packs, as code above `train/` (nothing below imports them).

`recipes.shapes` rebuilds the builtin shapes pack: `python -m clip2gan_cli.recipes.shapes.build`.
"""
