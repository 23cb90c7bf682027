"""Fixed numbers and names of the synthetic corpus (format, sizes of answers, acoustic design), kept apart so
that training and evaluation code can import them without the corpus builder."""

from __future__ import annotations

FORMAT_VERSION = 2  # 2: stage-3 SFT items without captions (they stay in stage 2)
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
DATASET_NAME = "diffa2-synth"
DEFAULT_CORPUS_DIR = "data/synth"
COMPLETE_MARKER = ".complete.json"
LOCK_FILE = ".build.lock"
DEFAULT_VOCAB_SIZE = 1024  # an upper bound for the tokenizer; the corpus yields fewer tokens

STAGES: tuple[str, ...] = ("stage1_asr", "stage2_acoustic", "stage3_sft", "stage4_pref")
SPLITS: tuple[str, ...] = ("train", "validation")
FAMILIES: tuple[str, ...] = ("speech", "sound", "music")

# ----------------------------------------------------------------------------------------------------------
# Acoustic design (see the package docstring of diffa2.data.synth)
# ----------------------------------------------------------------------------------------------------------
PILOT_HZ = 6800.0
PILOT_AMP = 0.01  # -40 dBFS
LOUDNESS_DB = {"quiet": (4.0, 10.0), "loud": (26.0, 32.0)}  # event amplitude over the pilot's
NOISE_REL = (0.4, 0.7)  # white-noise standard deviation, relative to PILOT_AMP
EDGE_S = 0.1  # events lie within [EDGE_S, CLIP_SECONDS - EDGE_S]

WORD_LOW_HZ = (420.0, 600.0, 860.0)
WORD_HIGH_HZ = (1300.0, 1850.0, 2600.0, 3700.0)
VOCABULARY: tuple[str, ...] = (
    "red", "blue", "green", "gold",
    "cat", "dog", "fish", "bird",
    "sun", "moon", "star", "rain",
)
# word i = low tone i // 4 and high tone i % 4
WORD_TONES: dict[str, tuple[float, float]] = {
    w: (WORD_LOW_HZ[i // len(WORD_HIGH_HZ)], WORD_HIGH_HZ[i % len(WORD_HIGH_HZ)])
    for i, w in enumerate(VOCABULARY)
}
PITCH_BASE_HZ = {"low": 210.0, "medium": 700.0, "high": 2200.0}  # register spans base .. base * 2**(5/12)
PITCH_SPAN_SEMITONES = 5
TEMPO_IOI_S = {"slow": (0.45, 0.55), "fast": (0.12, 0.15)}  # inter-onset interval of the melody
BEEP_S = 0.16  # every beep lasts the same: the total sounding time is then proportional to the count
BEEP_GAP_S = 0.2  # minimum silence between beeps (2.5 frames of the 12.5 Hz semantic adapter)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
# Answer regions of the embedded default, in tokens (answer + <|eot_id|> + EOS padding). Short on purpose: the tiny
# diffusion LM learns answers several-fold faster on short canvases (docs/experiment-log.md). Stage 1 transcripts, stage
# 3/4 answers and the test split fit in ANSWER_TOKENS; stage 2's captions (up to 8 tokens) need CAPTION_TOKENS.
ANSWER_TOKENS = 4
CAPTION_TOKENS = 10
