"""Benchmark specs: what data format a benchmark uses, how it is prompted, decoded and scored.

The YAML files shipped in the package (``diffa2/eval/benchmarks/<name>.yaml``, package data) are the only source
of the benchmark specs; the ``BenchmarkSpec`` dataclass is their typed schema (unknown keys are errors, missing
optional keys take the dataclass defaults, ``include:`` merges a base file). ``load_spec(name)`` reads them.

Facts (keys, breakdown axes, label sets, data versions) come from each benchmark's official repository (named in
its spec) and DIFFA-2's evaluation settings from NKU-HLT/DIFFA, DIFFA-2/run_mm{su,au,ar}_inference.sh.

Decoding profiles: a spec's `decoding` is the profile named by `profile` (`parallel`, the toolkit's default);
`profiles` holds the others. MMSU, MMAU and MMAR carry `paper`, the decoding of DIFFA-2's published inference
scripts, which is the default for a released DIFFA-2 checkpoint (`default_profile`; docs/decoding.md §5.3).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from diffa2.diffusion.decoding import DEFAULT_MODE, DecodeConfig

FORMATS = ("mmau_json", "mmar_jsonl", "mmsu")
RULES = ("mmau_wordset", "mmsu_letter")
MODES = ("official", "strict", "normalized")

# The shipped specs: package data, so a checkout, an editable install and a wheel all read the same files.
SPEC_DIR = Path(str(files("diffa2.eval") / "benchmarks"))


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the key."""


PAPER_PROFILE = "paper"
# DIFFA-2's inference scripts (DIFFA-2/run_mm{su,au,ar}_inference.sh) decode 16 tokens in one block of 16 steps,
# greedy, no CFG, low-confidence remasking.
DIFFA2_LENGTHS: dict[str, Any] = {"gen_length": 16, "block_length": 16, "steps": 16, "temperature": 0.0,
                                  "cfg_scale": 0.0, "remasking": "low_confidence"}


def _diffa2_decoding() -> DecodeConfig:
    """DIFFA-2's lengths with the default speed mode, DEFAULT_MODE (issue 6): the `parallel` profile."""
    return DecodeConfig.preset(DEFAULT_MODE, **DIFFA2_LENGTHS)


def paper_decoding() -> DecodeConfig:
    """The `paper` profile: `--accelerate fast_dllm` of DIFFA-2's scripts (factor 1.0 with the rule's edge case as
    coded, EOS early exit, no cache) at DIFFA-2's lengths."""
    return DecodeConfig.preset("fpd", factor_quirk=True, exit_on_eot=False, **DIFFA2_LENGTHS)


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
                            f"{sorted({self.profile, *self.profiles})}")
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


_REQUIRED = sorted(f.name for f in dataclasses.fields(BenchmarkSpec) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING)


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> BenchmarkSpec:
    """Build a spec from a mapping, rejecting unknown and missing required keys; other keys default to the schema's."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(_FIELDS)}")
    values = dict(data)
    if "decoding" in values:
        values["decoding"] = _decoding_from(values["decoding"], _diffa2_decoding(), source)
    if "profiles" in values:
        profiles = values["profiles"] or {}
        if not isinstance(profiles, dict):
            raise SpecError(f"{source}: profiles must be a mapping of name: decoding mapping")
        values["profiles"] = {profile: _decoding_from(settings, DecodeConfig(), source, f" profiles.{profile}")
                              for profile, settings in profiles.items()}
    for key in ("extra_prediction_keys", "breakdown"):
        if key in values:
            values[key] = tuple(values[key] or ())
    if "official_values" in values:
        values["official_values"] = {k: tuple(v) for k, v in (values["official_values"] or {}).items()}
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise SpecError(f"{source}: missing required key(s) {missing} (every spec sets {_REQUIRED})")
    try:
        return BenchmarkSpec(**values)
    except (SpecError, TypeError) as exc:
        raise SpecError(f"{source}: {exc}") from exc


def load_spec_file(path: str | Path) -> BenchmarkSpec:
    """Load one YAML spec (following ``include:``)."""
    path = Path(path)
    return spec_from_dict(_read_yaml(path), source=str(path))


@functools.cache
def benchmark_names() -> tuple[str, ...]:
    """The shipped benchmarks: every SPEC_DIR/<name>.yaml whose spec is named <name> (variants such as
    mmau_r1_aqa.yaml, which include a base spec, are chosen with --spec)."""
    return tuple(sorted(p.stem for p in SPEC_DIR.glob("*.yaml") if _read_yaml(p).get("name") == p.stem))


def load_spec(benchmark: str, spec_file: str | Path | None = None) -> BenchmarkSpec:
    """The spec for `benchmark`: `spec_file` if given, else the shipped SPEC_DIR/<benchmark>.yaml."""
    if spec_file is not None:
        spec = load_spec_file(spec_file)
        if spec.name != benchmark:
            raise SpecError(f"{spec_file}: spec is for {spec.name!r}, not {benchmark!r}")
        return spec
    if benchmark not in benchmark_names():
        raise SpecError(f"unknown benchmark {benchmark!r}; choose one of {list(benchmark_names())}")
    return load_spec_file(SPEC_DIR / f"{benchmark}.yaml")
