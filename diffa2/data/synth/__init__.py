"""The synthetic audio corpus of the embedded default: WAV files, DIFFA/DeSTA2 manifests, an MMAU-format test.

Run ``python -m diffa2.data.synth --help``. Everything is pure numpy and deterministic from the seed: the same
seed gives byte-identical files (WAVs, manifests, tokenizer).

Three families of 2-second clips, 16 kHz mono 16-bit PCM:

* ``speech`` -- an utterance of 1-3 words from a 12-word vocabulary. A word is a DTMF-like *dual tone*: one
  tone from a low group (3 frequencies) and one from a high group (4 frequencies) sounding together for
  0.22-0.30 s. Each word is identifiable from any single frame of the log-mel (two peaks >= 5 mel bins apart
  from those of every other word), which is what a tiny model trained for minutes can learn; a word built as a
  *sequence* of tones would need temporal composition on top.
* ``sound`` -- 1-4 pure-tone beeps of one pitch class, each 0.16 s long (so the total sounding time, a global
  cue, is proportional to the count), separated by >= 0.2 s of silence.
* ``music`` -- a melody (fundamental + octave, decaying notes) in one pitch register, slow and legato (a
  note every 0.45-0.55 s, ringing 85% of that) or fast and staccato (every 0.12-0.15 s, ringing 45%).

Attributes and where each can be asked (question kinds, which are MMAU sub-categories of the test split):

=================  =========================  =====================  ========
kind               answers                    clip families          task
=================  =========================  =====================  ========
Spoken Content     the words (1-3)            speech                 speech
Event Counting     one / two / three / four   sound                  sound
Pitch              low / medium / high        sound, music           music
Tempo              slow / fast                music                  music
Loudness           quiet / loud               speech, sound, music   sound
Background Noise   yes / no                   speech, sound, music   sound
=================  =========================  =====================  ========

Pitch classes are far apart on the mel axis (low 210-280 Hz = mel bins 5-7, medium 700-935 Hz = bins 18-24,
high 2.2-2.9 kHz = bins 46-55), so they survive the 80-bin log-mel whatever the clip's level.

Loudness. Whisper's log-mel is ``log10(power)`` clamped from below at ``max - 8`` and scaled ``(x + 4) / 4``:
the scale is absolute but the floor follows the clip's maximum, a loader may peak-normalise or gain-adjust the
waveform, and a per-frame normalisation in the model (LayerNorm over mel bins) removes any uniform shift. So
loudness is not left to the absolute level alone: *every* clip carries a constant reference tone (the "pilot",
6.8 kHz, -40 dBFS, mel bin 76, away from all content), and the events are rendered at a fixed level *relative
to the pilot*: quiet = +4..+10 dB, loud = +26..+32 dB. The event-to-pilot contrast is visible in the same
frames, survives any global gain, and does not depend on the clamp floor; the absolute level carries the same
information as a bonus when the waveform is left as generated.

Background noise is white noise 3-8 dB below the pilot's amplitude (noise "no" = digital silence besides the
pilot and the events). It lifts every mel bin by tens of dB above the silent floor: the most global cue.
"""

from diffa2.data.synth.build import (
    SIZES,
    SynthCorpus,
    SynthSizes,
    build_synth_corpus,
    ensure_synth_corpus,
    is_complete,
)
from diffa2.data.synth.cli import build_parser, main
from diffa2.data.synth.constants import (
    ANSWER_TOKENS,
    BEEP_GAP_S,
    BEEP_S,
    CAPTION_TOKENS,
    CLIP_SECONDS,
    COMPLETE_MARKER,
    COUNT_WORDS,
    DATASET_NAME,
    DEFAULT_CORPUS_DIR,
    DEFAULT_VOCAB_SIZE,
    EDGE_S,
    FAMILIES,
    FORMAT_VERSION,
    LOCK_FILE,
    LOUDNESS_DB,
    NOISE_REL,
    PILOT_AMP,
    PILOT_HZ,
    PITCH_BASE_HZ,
    PITCH_SPAN_SEMITONES,
    SAMPLE_RATE,
    SPLITS,
    STAGES,
    TEMPO_IOI_S,
    VOCABULARY,
    WORD_HIGH_HZ,
    WORD_LOW_HZ,
    WORD_TONES,
)
from diffa2.data.synth.items import chance_accuracy
from diffa2.data.synth.questions import (
    CAPTION_KIND,
    CAPTION_PHRASINGS,
    MC_FRACTION,
    QUESTION_KINDS,
    TRANSCRIPTION_KIND,
    QuestionKind,
    format_mc_prompt,
)
from diffa2.data.synth.render import Clip, render_clip

__all__ = [
    "ANSWER_TOKENS",
    "BEEP_GAP_S",
    "BEEP_S",
    "CAPTION_KIND",
    "CAPTION_PHRASINGS",
    "CAPTION_TOKENS",
    "CLIP_SECONDS",
    "COMPLETE_MARKER",
    "COUNT_WORDS",
    "DATASET_NAME",
    "DEFAULT_CORPUS_DIR",
    "DEFAULT_VOCAB_SIZE",
    "EDGE_S",
    "FAMILIES",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "LOUDNESS_DB",
    "MC_FRACTION",
    "NOISE_REL",
    "PILOT_AMP",
    "PILOT_HZ",
    "PITCH_BASE_HZ",
    "PITCH_SPAN_SEMITONES",
    "QUESTION_KINDS",
    "SAMPLE_RATE",
    "SIZES",
    "SPLITS",
    "STAGES",
    "TEMPO_IOI_S",
    "TRANSCRIPTION_KIND",
    "VOCABULARY",
    "WORD_HIGH_HZ",
    "WORD_LOW_HZ",
    "WORD_TONES",
    "Clip",
    "QuestionKind",
    "SynthCorpus",
    "SynthSizes",
    "build_parser",
    "build_synth_corpus",
    "chance_accuracy",
    "ensure_synth_corpus",
    "format_mc_prompt",
    "is_complete",
    "main",
    "render_clip",
]
