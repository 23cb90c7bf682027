"""One flag style (snake_case, kebab-case accepted) and one name per option across every command line (issue 14)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from helpers import bench_parser, bench_parsers

from diffa2 import rl
from diffa2.cli_flags import add_flag
from diffa2.config import parse_config
from diffa2.convert import build_parser as convert_parser
from diffa2.data.synth import ANSWER_TOKENS
from diffa2.data.synth.cli import build_parser as synth_parser
from diffa2.demo.cli import build_parser as demo_parser
from diffa2.diffusion.masking import forward_process
from diffa2.eval.__main__ import build_parser as eval_parser
from diffa2.serve.cli import build_parser as serve_parser
from diffa2.stages import vrpo
from diffa2.stages.cli import SFT_ARG_TYPES
from diffa2.stages.curriculum import refuse_clobbering
from diffa2.validation import parse_checked


def every_parser() -> dict[str, argparse.ArgumentParser]:
    """Every argparse command line, sub-commands included."""
    tops = {"eval": eval_parser(), "convert": convert_parser(), "demo": demo_parser(), "synth": synth_parser(),
            "serve": serve_parser()}
    tops |= bench_parsers()
    parsers = {}
    for name, parser in tops.items():
        parsers[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers |= {f"{name} {sub}": p for sub, p in action.choices.items()}
    return parsers


def kebab(argv: list[str]) -> list[str]:
    return [a.replace("_", "-") if a.startswith("--") else a for a in argv]


# -- the helper ----------------------------------------------------------------------------------------------------


def test_add_flag_parses_both_spellings_and_aliases_and_shows_the_canonical_name():
    parser = argparse.ArgumentParser(prog="p")
    add_flag(parser, "--batch_size", type=int, default=8, help="items per batch")
    add_flag(parser, "--model", "--checkpoint", required=True, help="checkpoint folder")
    add_flag(parser, "--exit_on_eot", action=argparse.BooleanOptionalAction, default=None, help="stop at EOT")
    snake = parser.parse_args(["--batch_size", "3", "--model", "a", "--no-exit_on_eot"])
    assert vars(snake) == {"batch_size": 3, "model": "a", "exit_on_eot": False}
    for argv in (["--batch-size", "3", "--checkpoint", "a", "--no-exit-on-eot"],
                 ["--batch_size", "3", "--checkpoint", "a", "--no-exit-on-eot"]):
        assert parser.parse_args(argv) == snake
    assert parser.parse_args(["--model", "a", "--exit-on-eot"]).exit_on_eot is True
    text = parser.format_help()
    assert "--batch_size BATCH_SIZE" in text and "--model MODEL" in text and "--exit_on_eot, --no-exit_on_eot" in text
    for hidden in ("--batch-size", "--checkpoint", "--exit-on-eot"):
        assert hidden not in text


def test_add_flag_refuses_a_kebab_case_canonical_name():
    with pytest.raises(ValueError, match="'--batch-size' is not a snake_case long option"):
        add_flag(argparse.ArgumentParser(), "--batch-size")


# -- every argparse command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(every_parser()))
def test_help_shows_only_snake_case_flags(name):
    parser = every_parser()[name]
    for action in parser._actions:
        for flag in action.option_strings:
            bare = flag[len("--no-"):] if flag.startswith("--no-") and action.nargs == 0 else flag[2:]
            assert "-" not in bare or not flag.startswith("--"), f"{name}: {flag}"
    text = parser.format_help()
    assert not [word for word in text.split() if word.startswith("--") and "-" in word.lstrip("-")
                and not word.startswith("--no-")], name


EVAL_RUN = ["--audio_root", "a", "--batch_size", "2", "--hf_revision", "r", "--no_progress", "--gen_length", "4",
            "--block_length", "4", "--cfg_scale", "0.5", "--logits_eos_inf", "--no-confidence_eos_eot_inf",
            "--decode_mode", "fast", "--factor_quirk", "--refresh_every", "3", "--no-eos_early_exit", "--exit_on_eot"]
# command line -> (parser, required arguments, every multi-word flag with a non-default value)
CASES = {
    "eval run": (eval_parser, ["run", "--benchmark", "synth"], EVAL_RUN),
    "eval score": (eval_parser, ["score", "--benchmark", "mmau", "--predictions", "p.json"], ["--prediction_key", "k"]),
    "demo": (demo_parser, [], ["--model", "ckpt", "--runs_dir", "r", "--max_upload_mb", "3"]),
    "synth": (synth_parser, [], ["--if_missing", "--vocab_size", "300"]),
    "convert": (convert_parser, ["official", "--src", "s", "--whisper", "w", "--llada", "l", "--out", "o"],
                ["--merge_lora", "--lora_alpha", "8", "--speech_path", "prompt+semantic"]),
    "bench/decode": (lambda: bench_parser("decode"), [],
                     ["--model", "c", "--gen_lengths", "8", "16", "--block_length", "8", "--batch_size", "2"]),
    "bench/vrpo_variance": (lambda: bench_parser("vrpo_variance"), [], ["--answer_length", "8", "--synth_dir", "d"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kebab_case_spellings_parse_to_the_same_options(name):
    build, required, flags = CASES[name]
    snake = parse_checked(build(), required + flags)
    assert parse_checked(build(), required + kebab(flags)) == snake
    defaults = vars(parse_checked(build(), required))
    changed = {k for k, v in vars(snake).items() if defaults[k] != v}
    assert changed == {f[2:].removeprefix("no-") for f in flags if f.startswith("--")}  # every flag took effect


def test_old_names_of_renamed_flags():
    assert parse_checked(demo_parser(), ["--checkpoint", "ckpt"]).model == "ckpt"
    assert parse_checked(bench_parser("decode"), ["--checkpoint", "ckpt"]).model == "ckpt"
    form = bench_parser("vrpo_variance")
    assert [form.parse_args(["--form", f]).form for f in ("l", "t", "count", "ratio")] == ["count", "ratio"] * 2
    assert form.parse_args([]).form == "count"


def test_range_errors_name_the_canonical_flag(capsys):
    with pytest.raises(SystemExit):
        parse_checked(eval_parser(), ["run", "--benchmark", "synth", "--batch-size", "0"])
    assert "--batch_size 0 is out of range: must be >= 1" in capsys.readouterr().err


# -- the training stages (HfArgumentParser) ------------------------------------------------------------------------


def stage_options(argv: list[str], arg_types: tuple[type, ...] = SFT_ARG_TYPES) -> dict:
    parsed = parse_config(arg_types, argv, "test")
    return {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}


def test_stage_flags_take_both_spellings_and_the_old_names():
    snake = stage_options(["--max_steps", "7", "--model", "ckpt", "--steps", "3", "--eval_batch_size", "2"])
    assert (snake["max_steps"], snake["model"], snake["steps"], snake["eval_batch_size"]) == (7, "ckpt", 3, 2)
    for argv in (["--max-steps", "7", "--init_from", "ckpt", "--decode_steps", "3", "--eval-batch-size", "2"],
                 ["--max-steps", "7", "--init-from", "ckpt", "--decode-steps", "3", "--eval-batch-size", "2"]):
        assert stage_options(argv) == snake
    defaults = stage_options([])
    assert (defaults["model"], defaults["steps"]) == ("auto", ANSWER_TOKENS)
    assert "init_from" not in defaults and "decode_steps" not in defaults


def test_stage_help_names_model_and_steps(capsys):
    with pytest.raises(SystemExit):
        parse_config(SFT_ARG_TYPES, ["--help"], "test")
    text = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL" in text and "--steps STEPS" in text
    assert "decoding steps of the end-of-stage evaluation (training steps: --max_steps)" in text


def test_curriculum_sees_the_overwrite_flag_in_either_spelling(tmp_path):
    (tmp_path / "sft" / "final").mkdir(parents=True)
    parser = argparse.ArgumentParser(prog="curriculum")
    for spelling in ("--overwrite_output_dir", "--overwrite-output-dir"):
        assert refuse_clobbering(parser, [spelling, "true"], [tmp_path / "sft"]) is None
    with pytest.raises(SystemExit):
        refuse_clobbering(parser, [], [tmp_path / "sft"])


def test_a_config_yaml_with_the_old_names_still_loads(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("init_from: ckpt/old\ndecode_steps: 5\n")
    new = tmp_path / "new.yaml"
    new.write_text("model: ckpt/old\nsteps: 5\n")
    loaded = stage_options(["--config", str(old)])
    assert loaded == stage_options(["--config", str(new)])
    assert (loaded["model"], loaded["steps"]) == ("ckpt/old", 5)
    both = tmp_path / "both.yaml"
    both.write_text("init_from: a\nmodel: b\n")
    with pytest.raises(ValueError, match=f"{both}: 'init_from' is the old name of 'model'; set only 'model'"):
        stage_options(["--config", str(both)])


# -- one masking-form vocabulary -----------------------------------------------------------------------------------


def test_masking_forms_are_one_vocabulary_with_the_letters_as_aliases():
    assert rl.MASKING_FORMS == ("ratio", "count")
    assert [rl.masking_form(f) for f in ("t", "l", "ratio", "count")] == ["ratio", "count", "ratio", "count"]
    with pytest.raises(ValueError, match="unknown masking form 'k'; valid forms: ratio, count"):
        rl.masking_form("k")
    assert rl.ElboEstimator(form="l").form == "count" and rl.ElboEstimator().form == "ratio"
    answer = torch.ones(3, 6, dtype=torch.bool)
    for letter, name in (("t", "ratio"), ("l", "count")):
        a = rl.sample_elbo_draws(answer, n_t=4, form=letter, generator=torch.Generator().manual_seed(1))
        b = rl.sample_elbo_draws(answer, n_t=4, form=name, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.masks, b.masks) and torch.equal(a.weights, b.weights)
        ids = torch.arange(18).view(3, 6)
        x = forward_process(ids, answer, 99, form=letter, generator=torch.Generator().manual_seed(2))
        y = forward_process(ids, answer, 99, form=name, generator=torch.Generator().manual_seed(2))
        assert torch.equal(x.noisy_ids, y.noisy_ids) and torch.equal(x.p_mask, y.p_mask)


def test_vrpo_elbo_form_takes_the_shared_names():
    parsed = stage_options(["--elbo_form", "l"], vrpo.ARG_TYPES)
    assert parsed["elbo_form"] == "count" and stage_options([], vrpo.ARG_TYPES)["elbo_form"] == "count"
    with pytest.raises(ValueError, match="--elbo_form: unknown masking form 'x'"):
        stage_options(["--elbo_form", "x"], vrpo.ARG_TYPES)
