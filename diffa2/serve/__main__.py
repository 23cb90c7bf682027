"""`python -m diffa2.serve`: the OpenAI-compatible server."""

from diffa2.serve.cli import main

main()
