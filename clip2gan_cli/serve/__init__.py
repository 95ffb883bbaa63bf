"""`clip2gan serve`: a local web page over the same library calls as the CLI.

app.ServeApp holds the models (loaded once) and turns page requests into calls of clip2gan_cli.pipeline
and clip2gan_cli.imageio; server.py is the HTTP layer (standard library only); page.py is the page;
command.py is the Typer command. Nothing here is imported by `clip2gan --help` except command.py, which
imports typer only.
"""
