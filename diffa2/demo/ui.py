"""The page: layout and wiring only; what happens to a clip and a question is in `diffa2.demo.answer`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from diffa2.demo import DEFAULT_MAX_UPLOAD_MB
from diffa2.demo.answer import (
    END_GLYPH,
    MASK_GLYPH,
    MAX_BATCH,
    MAX_QUESTION_CHARS,
    ChatTurn,
    DecodeSettings,
    DemoError,
    answer_clip,
    model_info,
    warm_up,
)
from diffa2.demo.checkpoints import NO_CHECKPOINT_HELP
from diffa2.demo.evaluation import evaluate_checkpoint, format_evaluation
from diffa2.demo.examples import EXAMPLE_QUESTIONS, example_clips
from diffa2.demo.training import TrainingFailed, run_training, tiny_default_command
from diffa2.diffusion.decoding import DEFAULT_MODE, PRESETS
from diffa2.runs import checkpoint_choices, default_checkpoint

logger = logging.getLogger(__name__)

# System fonts only: the default theme fetches Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = "#answer textarea { font-family: ui-monospace, monospace; font-size: 1.25em; }"
INTRO = (
    "# DIFFA-2 audio Q&A\nUpload a clip or record one, ask a question, and watch the diffusion model unmask its "
    f"answer step by step ({MASK_GLYPH} = still masked, {END_GLYPH} = end of answer). Ask follow-up questions, or "
    "upload another clip to compare: the conversation is kept until you start a new one."
)


def render_history(history: list[ChatTurn]) -> str:
    """The conversation so far as Markdown: each turn's question (with the clip it brought) and answer."""
    lines, last = [], None
    for i, turn in enumerate(history, start=1):
        clip = f" 🔊 *{Path(turn.audio).name}*" if turn.audio and turn.audio != last else ""
        last = turn.audio or last
        lines.append(f"**{i}.**{clip} {turn.question}  \n→ {turn.answer or '(empty answer)'}")
    return "\n\n".join(lines)


@dataclass
class DemoOptions:
    """What the page needs to know beyond its controls."""

    runs_dir: Path = Path("runs")  # where stage runs write `<stage>/final` checkpoints
    checkpoint: str | None = None  # preselected checkpoint; default: the latest embedded-default one
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    compat: str | None = None  # "toolkit" or "reference" for every checkpoint; default: each checkpoint's own
    examples_dir: Path | None = None  # synthetic example clips; default: <runs_dir>/demo-examples
    train_command: list[str] = field(default_factory=list)  # default: the embedded default's SFT stage
    allow_training: bool = False  # show the train button (and its API endpoint); off unless --allow_training

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir)
        self.examples_dir = Path(self.examples_dir or self.runs_dir / "demo-examples")
        self.train_command = self.train_command or tiny_default_command(self.runs_dir)

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (Gradio's max_file_size and the answer function's check)."""
        return int(self.max_upload_mb * 2**20)


def build_app(options: DemoOptions) -> gr.Blocks:
    """The Gradio Blocks of the demo."""
    clips, kinds = example_clips(options.examples_dir)
    defaults = DecodeSettings.from_mode(DEFAULT_MODE)
    selected = default_checkpoint(options.runs_dir, options.checkpoint)

    with gr.Blocks(title="DIFFA-2 audio Q&A", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio clip", elem_id="audio")
                question = gr.Textbox(label="Question", placeholder="e.g. What is the pitch of the sound?",
                                      elem_id="question", max_length=MAX_QUESTION_CHARS)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    new = gr.Button("New conversation", elem_id="new-conversation")
                history = gr.State([])
                conversation = gr.Markdown(elem_id="conversation")
                gr.Examples([[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions")
                gr.Examples(clips, inputs=[audio, question], example_labels=kinds,
                            label="Synthetic corpus examples (one clip per question kind)")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=2, interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
                with gr.Accordion("Model", open=selected is None):
                    checkpoint = gr.Dropdown(checkpoint_choices(options.runs_dir, options.checkpoint), value=selected,
                                             allow_custom_value=True, label="Checkpoint directory")
                    info = gr.Markdown(elem_id="model-info")
                    missing = gr.Markdown(NO_CHECKPOINT_HELP.format(runs=options.runs_dir), visible=selected is None)
                    train = gr.Button("Train the tiny default (about 13 min on CPU)", elem_id="train",
                                      visible=options.allow_training)
                    trained = gr.Markdown(elem_id="train-status")
                    measure = gr.Button("Accuracy on the synthetic test split", elem_id="evaluate")
                    measured = gr.Markdown(elem_id="evaluate-status")
                with gr.Accordion("Decoding settings", open=False):
                    mode = gr.Dropdown(list(PRESETS), value=DEFAULT_MODE, label="Mode",
                                       info="a named preset: it sets the four speed controls below")
                    gen_length = gr.Slider(1, 512, value=defaults.gen_length, step=1, label="Answer length (tokens)")
                    block_length = gr.Slider(1, 512, value=defaults.block_length, step=1, label="Block length")
                    steps = gr.Slider(1, 512, value=defaults.steps, step=1, label="Steps (at most)")
                    threshold = gr.Slider(0.0, 1.0, value=defaults.threshold, step=0.01,
                                          label="Confidence threshold of parallel decoding (0 = off)")
                    factor = gr.Slider(0.0, 8.0, value=defaults.factor, step=0.1,
                                       label="Factor of parallel decoding (0 = off)")
                    cache = gr.Radio(["none", "prefix", "dual"], value=defaults.cache, label="KV cache")
                    eos_early_exit = gr.Checkbox(value=defaults.eos_early_exit, label="Stop once the answer has ended")
                    delay = gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="Pause between frames shown (s)")

        async def on_answer(audio, question, history, checkpoint, gen_length, block_length, steps, threshold, factor,
                            cache, eos_early_exit, delay) -> AsyncIterator[tuple]:
            settings = DecodeSettings(gen_length=gen_length, block_length=block_length, steps=steps,
                                      threshold=threshold, factor=factor, cache=cache, eos_early_exit=eos_early_exit)
            async for update in answer_clip(audio, question, checkpoint, settings,
                                            max_bytes=options.max_upload_bytes, delay=delay, compat=options.compat,
                                            history=history):
                if update.done and not update.failed:  # an answered turn joins the conversation
                    history = [*history, ChatTurn(audio, question.strip(), update.text)]
                yield update.text, update.status, history

        def on_checkpoint(checkpoint: str | None) -> str:
            return model_info(checkpoint, options.compat) if checkpoint else ""

        def on_train(progress=gr.Progress()) -> tuple:  # noqa: B008 (Gradio's way to ask for a progress bar)
            fraction = 0.0
            progress(fraction, desc="starting")
            try:
                for report in run_training(options.train_command, options.runs_dir.resolve().parent):
                    fraction = fraction if report.fraction is None else report.fraction
                    progress(fraction, desc=report.message)
            except (TrainingFailed, OSError) as exc:
                logger.error("training failed: %s", exc)
                head, _, tail = str(exc).partition("\n")
                return gr.update(), gr.update(), f"⚠ {head}\n\n```\n{tail}\n```"
            latest = default_checkpoint(options.runs_dir)
            if latest is None:
                return gr.update(), gr.update(), f"⚠ Training ended without a checkpoint in `{options.runs_dir}`."
            choices = checkpoint_choices(options.runs_dir, options.checkpoint)
            selected = gr.update(choices=choices, value=latest)
            return selected, gr.update(visible=False), f"Trained and selected `{latest}`."

        def on_evaluate(checkpoint, gen_length, block_length, steps, threshold, factor, cache, eos_early_exit) -> str:
            settings = DecodeSettings(gen_length=gen_length, block_length=block_length, steps=steps,
                                      threshold=threshold, factor=factor, cache=cache, eos_early_exit=eos_early_exit)
            try:  # the corpus the train button's stage builds and tests on (its working directory's data/synth)
                from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus

                corpus = ensure_synth_corpus(options.runs_dir.resolve().parent / DEFAULT_CORPUS_DIR)
                return format_evaluation(evaluate_checkpoint(checkpoint, corpus.test_mmau, settings,
                                                             compat=options.compat))
            except (DemoError, ValueError) as exc:
                return f"⚠ {exc}"

        def on_mode(name: str) -> tuple:
            chosen = DecodeSettings.from_mode(name)
            return chosen.threshold, chosen.factor, chosen.cache, chosen.eos_early_exit

        mode.change(on_mode, mode, [threshold, factor, cache, eos_early_exit], api_visibility="private")
        inputs = [audio, question, history, checkpoint, gen_length, block_length, steps, threshold, factor, cache,
                  eos_early_exit, delay]
        # Answers share the model's batcher and pause without a worker (async): several may run at once.
        gr.on([ask.click, question.submit], on_answer, inputs, [answer, status, history], api_name="answer",
              show_progress="minimal", concurrency_limit=MAX_BATCH)
        history.change(render_history, history, conversation, api_visibility="private")
        new.click(lambda: ([], "", ""), None, [history, answer, status], api_visibility="private")
        gr.on([app.load, checkpoint.change], on_checkpoint, checkpoint, info, api_name="model_info")
        if options.allow_training:
            train.click(on_train, None, [checkpoint, missing, trained], api_name="train")
        measure.click(on_evaluate, [checkpoint, gen_length, block_length, steps, threshold, factor, cache,
                                    eos_early_exit], measured, api_name="evaluate")
    return app


def launch(options: DemoOptions, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           **kwargs) -> gr.Blocks:
    """Build and launch the demo (non-blocking when `prevent_thread_lock=True` is passed, as tests do)."""
    warm_up()
    app = build_app(options)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=options.max_upload_bytes,
               allowed_paths=[str(options.examples_dir.resolve())], theme=THEME, css=CSS, **kwargs)
    return app
