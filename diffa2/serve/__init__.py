"""OpenAI-compatible audio chat server: `python -m diffa2.serve --model DIR` (docs/serving.md).

schema.py holds the request/response bodies and limits, audio.py decodes `input_audio` parts, planning.py turns a
request into a clip, a question and a `DecodeConfig`, app.py is the FastAPI app over one continuous batcher
(`diffa2.diffusion.continuous`), cli.py parses the flags and runs uvicorn.
"""
