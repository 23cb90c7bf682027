"""Benchmark specs: what data format a benchmark uses, how it is prompted, decoded and scored.

One typed source of defaults (``BUILTIN_SPECS``); the YAML files in the repository's ``eval/`` folder are the
documented recipes and load into the same dataclass (unknown keys are errors, ``include:`` merges a base file).
A test checks that every shipped YAML equals its built-in spec, so a checkout and an installed package agree.

Facts (keys, breakdown axes, label sets, data versions) come from each benchmark's official repository (named in
its spec) and DIFFA-2's evaluation settings from NKU-HLT/DIFFA, DIFFA-2/run_mm{su,au,ar}_inference.sh.

Decoding profiles: a spec's `decoding` is the profile named by `profile` (`parallel`, the toolkit's default);
`profiles` holds the others. MMSU, MMAU and MMAR carry `paper`, the decoding of DIFFA-2's published inference
scripts, which is the default for a released DIFFA-2 checkpoint (`default_profile`; docs/decoding.md §5.3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffa2.data.synth import ANSWER_TOKENS
from diffa2.diffusion.decoding import DEFAULT_MODE, DecodeConfig

FORMATS = ("mmau_json", "mmar_jsonl", "mmsu")
RULES = ("mmau_wordset", "mmsu_letter")
MODES = ("official", "strict", "normalized")

# The repository's eval/ folder (present in a checkout, absent from a wheel).
REPO_SPEC_DIR = Path(__file__).resolve().parents[2] / "eval"


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the key."""


PAPER_PROFILE = "paper"
# DIFFA-2's inference scripts (DIFFA-2/run_mm{su,au,ar}_inference.sh) decode 16 tokens in one block of 16 steps,
# greedy, no CFG, low-confidence remasking.
DIFFA2_LENGTHS: dict[str, Any] = {"gen_length": 16, "block_length": 16, "steps": 16, "temperature": 0.0,
                                  "cfg_scale": 0.0, "remasking": "low_confidence"}  # fmt: skip


def _diffa2_decoding() -> DecodeConfig:
    """DIFFA-2's lengths with the default speed mode, DEFAULT_MODE (issue 6): the `parallel` profile."""
    return DecodeConfig.preset(DEFAULT_MODE, **DIFFA2_LENGTHS)


def paper_decoding() -> DecodeConfig:
    """The `paper` profile: `--accelerate fast_dllm` of DIFFA-2's scripts (factor 1.0 with the rule's edge case as
    coded, EOS early exit, no cache) at DIFFA-2's lengths."""
    return DecodeConfig.preset("fpd", factor_quirk=True, exit_on_eot=False, **DIFFA2_LENGTHS)


def _paper_profiles() -> dict[str, DecodeConfig]:
    return {PAPER_PROFILE: paper_decoding()}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything the runner and the scorer need to know about one benchmark."""

    name: str  # the --benchmark name
    version: int  # bump when prompts, decoding or scoring change in a way that changes numbers
    description: str
    format: str  # data / submission format: one of FORMATS
    data_version: str  # which release of the data this spec was checked against (pin it in reports)
    default_data: str | None = None  # used when --data is not given (HF id, path, or "synth")
    default_model: str | None = None  # used when --model is not given (synth: the embedded default's checkpoint)
    hf_split: str = "train"  # split to read when --data is a Hugging Face dataset id
    prompt: str = "diffa"  # template name in diffa2.eval.prompts
    decoding: DecodeConfig = field(default_factory=_diffa2_decoding)
    profile: str = DEFAULT_MODE  # the name of the decoding profile `decoding` holds
    profiles: dict[str, DecodeConfig] = field(default_factory=dict)  # the other named decoding profiles
    rule: str = "mmau_wordset"  # one of RULES
    mode: str = "official"  # one of MODES
    prediction_key: str = "model_output"  # the key the official scorer reads
    extra_prediction_keys: tuple[str, ...] = ()  # written with the same text, for older scorer forks
    predictions_file: str = "predictions.json"
    breakdown: tuple[str, ...] = ()  # per-value accuracy reported for each of these fields
    # Values the official scorer accepts for a field; others make it raise KeyError (we count and warn).
    official_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aggregation: str = "micro"  # accuracy over items (the official "Total Accuracy" of every scorer here)
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SpecError(f"spec {self.name!r}: format {self.format!r} is not one of {FORMATS}")
        if self.rule not in RULES:
            raise SpecError(f"spec {self.name!r}: rule {self.rule!r} is not one of {RULES}")
        if self.mode not in MODES:
            raise SpecError(f"spec {self.name!r}: mode {self.mode!r} is not one of {MODES}")
        if self.aggregation != "micro":
            raise SpecError(f"spec {self.name!r}: only micro aggregation is implemented, got {self.aggregation!r}")

    def replace(self, **changes: Any) -> BenchmarkSpec:
        return dataclasses.replace(self, **changes)

    def with_profile(self, name: str) -> BenchmarkSpec:
        """This spec decoding with profile `name`; the profile it replaces joins `profiles`."""
        if name == self.profile:
            return self
        if name not in self.profiles:
            raise SpecError(f"spec {self.name!r} has no decoding profile {name!r}; choose one of "
                            f"{sorted({self.profile, *self.profiles})}")  # fmt: skip
        others = {k: v for k, v in self.profiles.items() if k != name} | {self.profile: self.decoding}
        return self.replace(decoding=self.profiles[name], profile=name, profiles=others)

    def default_profile(self, release: str | None) -> str:
        """`paper` for a released DIFFA-2 checkpoint (`release` set) where the spec has it, else its own."""
        return PAPER_PROFILE if release is not None and PAPER_PROFILE in self.profiles else self.profile

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["extra_prediction_keys"] = list(self.extra_prediction_keys)
        out["breakdown"] = list(self.breakdown)
        out["official_values"] = {k: list(v) for k, v in self.official_values.items()}
        return out


# ---------------------------------------------------------------------------------------------------------------
# Built-in specs
# ---------------------------------------------------------------------------------------------------------------

_MMAU_TASKS = ("sound", "music", "speech")
_MMAU_DIFFICULTIES = ("easy", "medium", "hard")
# MMAR's scorer has fixed modality and category tables (ddlBoJack/MMAR code/evaluation.py).
_MMAR_MODALITIES = ("sound", "music", "speech", "mix-sound-music", "mix-sound-speech", "mix-music-speech",
                    "mix-sound-music-speech")  # fmt: skip
_MMAR_CATEGORIES = ("Signal Layer", "Perception Layer", "Semantic Layer", "Cultural Layer")

BUILTIN_SPECS: dict[str, BenchmarkSpec] = {
    "mmau": BenchmarkSpec(
        name="mmau",
        version=2,
        description="MMAU test-mini (1,000 items with answers), scored with Sakshi113/MMAU evaluation.py's rule",
        format="mmau_json",
        data_version="MMAU-v05.15.25 (mmau-test-mini.json, Sakshi113/MMAU@f0a4a97)",
        prompt="diffa",
        profiles=_paper_profiles(),
        rule="mmau_wordset",
        prediction_key="model_output",  # read by evaluation.py since 7468292 (2025-01-29)
        extra_prediction_keys=("model_prediction",),  # the README's key, read by older forks (e.g. DIFFA's)
        predictions_file="predictions.json",  # evaluation.py reads a JSON list only
        breakdown=("task", "difficulty", "sub-category", "category"),
        official_values={"task": _MMAU_TASKS, "difficulty": _MMAU_DIFFICULTIES},
    ),
    "mmar": BenchmarkSpec(
        name="mmar",
        version=2,
        description="MMAR (1,000 items), scored with ddlBoJack/MMAR code/evaluation.py's rule (MMAU's, unchanged)",
        format="mmar_jsonl",
        data_version="MMAR-meta.jsonl (ddlBoJack/MMAR@a355584, 2026-02-16)",
        prompt="diffa",  # DIFFA-2 reuses its MMAU script and prompt on MMAR (DIFFA-2/run_mmar_inference.sh)
        profiles=_paper_profiles(),
        rule="mmau_wordset",
        prediction_key="answer_prediction",
        predictions_file="predictions.jsonl",  # the scorer picks JSON or JSONL by extension
        breakdown=("modality", "category", "sub-category"),
        official_values={"modality": _MMAR_MODALITIES, "category": _MMAR_CATEGORIES},
    ),
    "mmsu": BenchmarkSpec(
        name="mmsu",
        version=2,
        description="MMSU (5,000 items), scored with dingdongwang/MMSU mmsu_evaluation.py's letter rule",
        format="mmsu",
        data_version="ddwang2000/MMSU split train (record the HF revision); scorer dingdongwang/MMSU@217d1d3",
        default_data="ddwang2000/MMSU",
        hf_split="train",
        prompt="diffa_mmsu",
        profiles=_paper_profiles(),
        rule="mmsu_letter",
        prediction_key="response",
        predictions_file="predictions.jsonl",
        breakdown=("category", "sub-category", "sub-sub-category"),
    ),
    "synth": BenchmarkSpec(
        name="synth",
        version=3,
        description="the synthetic corpus's held-out test split (test_mmau.json, MMAU format), MMAU's rule",
        format="mmau_json",
        data_version="diffa2.data.synth test_mmau.json (format_version recorded in corpus_info.json)",
        default_data="synth",  # build / reuse the embedded default's corpus at data/synth
        default_model="runs/sft/final",  # what `make train` (python -m diffa2.stages.sft) writes
        prompt="diffa",  # the same MC prompt the corpus trains with (diffa2.data.synth.format_mc_prompt)
        rule="mmau_wordset",
        prediction_key="model_output",
        extra_prediction_keys=("model_prediction",),
        predictions_file="predictions.json",
        breakdown=("sub-category", "task", "difficulty"),
        # The lengths the embedded default is trained and tested with (ANSWER_TOKENS; at
        # DIFFA-2's 16 it has never seen the extra EOS positions and scores 0 % in every mode, bench/decode.py).
        decoding=DecodeConfig.preset(DEFAULT_MODE, gen_length=ANSWER_TOKENS, block_length=ANSWER_TOKENS,
                                     steps=ANSWER_TOKENS),
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(BenchmarkSpec)}
_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise SpecError(f"{path}: include cycle ({' -> '.join(str(p) for p in seen + (path,))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc})") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping, got {type(data).__name__}")
    base_name = data.pop("include", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise SpecError(f"{path}: include must be a file name, got {base_name!r}")
    base = _read_yaml(path.parent / base_name, seen + (path,))
    decoding = {**base.get("decoding", {}), **data.get("decoding", {})}
    merged = {**base, **data}
    if decoding:
        merged["decoding"] = decoding
    return merged


def _decoding_from(settings: Any, base: DecodeConfig, source: str, where: str = "") -> DecodeConfig:
    """`base` with the keys of a YAML decoding mapping set; unknown keys and invalid settings are named."""
    if not isinstance(settings, dict):
        raise SpecError(f"{source}{where}: decoding must be a mapping of {sorted(_DECODE_FIELDS)}")
    bad = sorted(set(settings) - _DECODE_FIELDS)
    if bad:
        raise SpecError(f"{source}{where}: unknown decoding key(s) {bad}; valid keys: {sorted(_DECODE_FIELDS)}")
    try:
        return dataclasses.replace(base, **settings)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{source}{where}: decoding: {exc}") from exc


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> BenchmarkSpec:
    """Build a spec from a mapping, rejecting unknown keys; missing keys come from the built-in spec of `name`."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(_FIELDS)}")
    name = data.get("name")
    if name not in BUILTIN_SPECS:
        raise SpecError(f"{source}: name must be one of {sorted(BUILTIN_SPECS)} (the base spec), got {name!r}")
    base = BUILTIN_SPECS[name]
    values = dict(data)
    if "decoding" in values:
        values["decoding"] = _decoding_from(values["decoding"], base.decoding, source)
    if "profiles" in values:
        profiles = values["profiles"] or {}
        if not isinstance(profiles, dict):
            raise SpecError(f"{source}: profiles must be a mapping of name: decoding mapping")
        values["profiles"] = {profile: _decoding_from(settings, base.profiles.get(profile, DecodeConfig()), source,
                                                      f" profiles.{profile}")
                              for profile, settings in profiles.items()}  # fmt: skip
    for key in ("extra_prediction_keys", "breakdown"):
        if key in values:
            values[key] = tuple(values[key] or ())
    if "official_values" in values:
        values["official_values"] = {k: tuple(v) for k, v in (values["official_values"] or {}).items()}
    try:
        return base.replace(**values)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from exc
    except TypeError as exc:
        raise SpecError(f"{source}: {exc}") from exc


def load_spec_file(path: str | Path) -> BenchmarkSpec:
    """Load one YAML spec (following ``include:``)."""
    path = Path(path)
    return spec_from_dict(_read_yaml(path), source=str(path))


def load_spec(benchmark: str, spec_file: str | Path | None = None) -> BenchmarkSpec:
    """The spec for `benchmark`: `spec_file` if given, else the repository's eval/<benchmark>.yaml, else built-in."""
    if spec_file is not None:
        spec = load_spec_file(spec_file)
        if spec.name != benchmark:
            raise SpecError(f"{spec_file}: spec is for {spec.name!r}, not {benchmark!r}")
        return spec
    if benchmark not in BUILTIN_SPECS:
        raise SpecError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BUILTIN_SPECS)}")
    repo_file = REPO_SPEC_DIR / f"{benchmark}.yaml"
    if repo_file.is_file():
        return load_spec_file(repo_file)
    return BUILTIN_SPECS[benchmark]
