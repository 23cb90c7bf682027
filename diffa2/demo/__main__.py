"""`python -m diffa2.demo`: serve the Gradio audio Q&A demo."""

from diffa2.demo.cli import main

main()
