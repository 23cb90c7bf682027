"""The Gradio audio Q&A demo: `python -m diffa2.demo` (or `python demo/app.py`).

answer.py holds everything the page does to a clip and a question (validation, decoding, the unmasking view),
checkpoints.py finds checkpoints, training.py trains the tiny default with progress, examples.py picks clips of
the synthetic corpus, ui.py lays out the page and cli.py launches it.
"""

DEFAULT_MAX_UPLOAD_MB = 25.0  # uploads above this are refused (by Gradio at upload time and by the answer function)
