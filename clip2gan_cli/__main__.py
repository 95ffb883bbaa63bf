"""`python -m clip2gan_cli` runs the CLI (also how torchrun starts training)."""
from .cli import main

if __name__ == "__main__":
    main()
