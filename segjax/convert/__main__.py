"""`python -m segjax.convert`: see segjax/convert/__init__.py."""
from segjax.convert import main

main()
