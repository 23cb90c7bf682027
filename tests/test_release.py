"""The released DIFFA-2 layout: import gives the composed model's logits, export reproduces the file, errors name."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from release_writer import WHISPER_TINY_TAPS, make_tiny_release, write_release
from safetensors.torch import load_file
from tiny_checkpoints import write_tiny_hf_whisper
from tiny_llada import tiny_llada_config, tiny_llada_state_dict, write_tiny_llada
from transformers import WhisperConfig

from diffa2.chat import DEFAULT_SYSTEM_PROMPT
from diffa2.convert import main
from diffa2.data.tokenizer import SYSTEM_PROMPT_LONG
from diffa2.inference import AudioQA
from diffa2.modeling.checkpoint import load_pretrained
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.release import import_release, is_release_dir, save_release
from diffa2.modeling.safe_load import CheckpointError

HUB_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
# LLaDA module -> its module inside a transformers Llama layer (the renaming of docs/release-format.md).
LLAMA_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj"}



@pytest.fixture(scope="module")
def release(chat):
    """Random tiny DIFFA-2 tensors with LoRA (r 8), LLaDA ids from the test tokenizer."""
    llm = tiny_llada_config(vocab=len(chat.tokenizer), mask_id=chat.ids.mask, eos_id=chat.ids.eos)
    return make_tiny_release(llm_config=llm)


@pytest.fixture
def fp32_dir(tmp_path, release, tokenizer_dir):
    directory = write_release(release, tmp_path / "release", dtype=torch.float32)
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    return directory


def without_hub_keys(config: dict) -> dict:
    """An embedded config as read back from config.json (JSON keys are strings), without where-saved keys."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in HUB_KEYS}


def expected_config(release, lora: LoraSettings | None, speech_path: str = "acoustic+semantic") -> DIFFA2Config:
    """The toolkit config a tiny release stands for, written out by hand."""
    return DIFFA2Config(encoder=without_hub_keys(release.whisper_config), backbone=without_hub_keys(release.llm_config),
                        tap_layers=WHISPER_TINY_TAPS, num_queries=8, qformer_layers=2, qformer_heads=4,
                        qformer_intermediate=3072, qformer_dropout=0.1, num_prompt_embeddings=20,
                        system_prompt=DEFAULT_SYSTEM_PROMPT, training_system_prompt=SYSTEM_PROMPT_LONG,
                        compat="reference", lora=lora, speech_path=speech_path)


def composed_model(release, config: DIFFA2Config) -> DIFFA2Model:
    """A toolkit model holding the release's tensors, each set by attribute (no name mapping involved)."""
    bare = copy.deepcopy(config)
    bare.lora = None
    model = DIFFA2Model(bare)
    acoustic = model.acoustic_adapter
    with torch.no_grad():
        model.encoder.encoder.load_state_dict(release.whisper)
        model.backbone.load_llada_state_dict(release.llada)
        for role, (weight, bias) in release.semantic.items():
            getattr(model.semantic_adapter, role).weight.copy_(weight)
            getattr(model.semantic_adapter, role).bias.copy_(bias)
        acoustic.queries.copy_(torch.cat(release.queries))
        acoustic.tap_logits.copy_(release.tap_weights)
        acoustic.qformer.load_state_dict(release.qformer)
        for module, (weight, bias) in ((acoustic.norm, release.out_norm), (acoustic.proj, release.out_proj)):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        model.prompt_embeddings.weight.copy_(release.prompts)
        if config.lora is not None:
            model.add_lora(copy.deepcopy(config.lora))
            layers = model.backbone.lm.base_model.model.model.layers
            for (i, name), (a, b) in release.lora.items():
                target = layers[i].get_submodule(LLAMA_MODULE[name])
                target.lora_A["default"].weight.copy_(a)
                target.lora_B["default"].weight.copy_(b)
    return model.eval()


@torch.no_grad()
def logits(model: DIFFA2Model, chat) -> torch.Tensor:
    """Answer logits of two clips (one padded) with two prompts, in eval mode, as fp32."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 80, 200, generator=gen)
    mask = chat.ids.mask
    answers = torch.tensor([[mask, 12, mask], [13, mask, mask]])
    out = model(features, torch.tensor([200, 120]), [[5, 6, 7, 8], [9, 10, 11]], [2, 1], answers)
    return out.float()


def read_bin(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- import -----------------------------------------------------------------------------------------------


def test_import_gives_the_logits_of_the_composed_model(chat, release, fp32_dir):
    imported = import_release(fp32_dir)
    expected = logits(composed_model(release, expected_config(release, LoraSettings())), chat)
    assert imported.lora == "kept (r 8, alpha 16)"
    assert torch.equal(logits(imported.model, chat), expected)
    without_lora = logits(composed_model(release, expected_config(release, None)), chat)
    assert float((expected - without_lora).abs().max()) > 1.0  # the LoRA matrices matter (max |logit| 4.4)


def test_a_release_without_lora_imports_and_exports(chat, tmp_path, tokenizer_dir):
    """The stage-1/2 layout: `llm_model.model.transformer.*`, no peft wrapper; stage 1 leads with the prompts."""
    llm = tiny_llada_config(vocab=len(chat.tokenizer), mask_id=chat.ids.mask, eos_id=chat.ids.eos)
    release = make_tiny_release(llm_config=llm, lora_rank=None, seed=3)
    directory = write_release(release, tmp_path / "stage1", dtype=torch.float32)
    imported = import_release(directory, tokenizer=tokenizer_dir, speech_path="prompt+semantic")
    assert imported.lora == "none"
    assert "llm_model.model.transformer.wte.weight" in read_bin(directory / "pytorch_model.bin")
    expected = composed_model(release, expected_config(release, None, "prompt+semantic"))
    assert torch.equal(logits(imported.model, chat), logits(expected, chat))
    exported = save_release(imported.model, tmp_path / "out", dtype=torch.float32)
    assert_same_tensors(read_bin(exported.directory / "pytorch_model.bin"), read_bin(directory / "pytorch_model.bin"))


def test_import_reads_sizes_lora_and_prompts_from_the_release(release, fp32_dir):
    config = import_release(fp32_dir).model.config
    expected = expected_config(release, LoraSettings())
    for name in ("encoder", "backbone", "tap_layers", "num_queries", "qformer_heads", "qformer_intermediate",
                 "num_prompt_embeddings", "speech_path", "system_prompt", "training_system_prompt", "compat", "lora"):
        assert getattr(config, name) == getattr(expected, name), name
    assert config.release == f"{fp32_dir.resolve()} (pytorch_model.bin)"
    assert config.tokenizer_source == "tokenizer" and config.encoder_source is None


def test_adapter_config_sets_lora_alpha(chat, release, fp32_dir):
    (fp32_dir / "lora_weights").mkdir()
    (fp32_dir / "lora_weights" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    imported = import_release(fp32_dir, lora_alpha=16)
    assert imported.model.config.lora.alpha == 32
    expected = composed_model(release, expected_config(release, LoraSettings(alpha=32)))
    assert torch.equal(logits(imported.model, chat), logits(expected, chat))


def test_merged_lora_gives_the_same_logits(chat, fp32_dir):
    kept, merged = import_release(fp32_dir), import_release(fp32_dir, merge_lora=True)
    assert merged.lora == "merged (r 8, alpha 16)" and merged.model.config.lora is None
    assert not any("lora_" in k for k in merged.model.state_dict())
    difference = (logits(kept.model, chat) - logits(merged.model, chat)).abs().max()
    assert float(difference) < 1e-5  # measured 2.3e-6: fp32 rounding of W + s·BA


def test_safetensors_are_preferred_over_the_pickle(release, tmp_path, tokenizer_dir):
    state = release.state_dict()
    pickled = state | {"trainable_prompts.weight": torch.zeros_like(release.prompts)}
    directory = write_release(release, tmp_path / "both", dtype=torch.float32, state=pickled, safetensors_state=state)
    imported = import_release(directory, tokenizer=tokenizer_dir)
    assert imported.weights_file.name == "model.safetensors"
    assert torch.equal(imported.model.prompt_embeddings.weight, release.prompts)


def test_bf16_release_logits_stay_within_the_stated_bound(chat, release, tmp_path, tokenizer_dir):
    """Measured on this tiny model (max |logit| 4.4): bf16 storage moves logits by 0.045, bf16 compute by 0.084."""
    reference = logits(import_release(write_release(release, tmp_path / "fp32", dtype=torch.float32),
                                      tokenizer=tokenizer_dir).model, chat)
    bf16_dir = write_release(release, tmp_path / "bf16")
    stored = (logits(import_release(bf16_dir, tokenizer=tokenizer_dir).model, chat) - reference).abs().max()
    computed = (logits(import_release(bf16_dir, tokenizer=tokenizer_dir, dtype=torch.bfloat16).model, chat)
                - reference).abs().max()
    print(f"max |logit|: {float(reference.abs().max()):.3f}; bf16 weights in fp32: {float(stored):.4f}; "
          f"bf16 weights and compute: {float(computed):.4f}")
    assert 0 < float(stored) < 0.1
    assert 0 < float(computed) < 0.2


# -- export -----------------------------------------------------------------------------------------------


def test_export_writes_the_reference_names_and_round_trips_bit_exactly(release, fp32_dir, tmp_path):
    first = save_release(import_release(fp32_dir).model, tmp_path / "first", dtype=torch.float32)
    assert_same_tensors(read_bin(first.directory / "pytorch_model.bin"), read_bin(fp32_dir / "pytorch_model.bin"))
    written, exported = (json.loads((d / "config.json").read_text()) for d in (fp32_dir, first.directory))
    assert sorted(exported) == sorted(written)
    for key in written:  # the embedded configs differ only in where they were saved from
        same = without_hub_keys if key.endswith("_config") and key != "acoustic_connector_config" else dict
        assert (same(exported[key]) if isinstance(written[key], dict) else exported[key]) == (
            same(written[key]) if isinstance(written[key], dict) else written[key]), key
    assert exported["llm_config"]["_name_or_path"] == "GSAI-ML/LLaDA-8B-Instruct"

    shutil.copytree(fp32_dir / "tokenizer", first.directory / "tokenizer")
    second = save_release(import_release(first.directory).model, tmp_path / "second", dtype=torch.float32)
    assert_same_tensors(*(read_bin(d / "pytorch_model.bin") for d in (second.directory, first.directory)))
    for name in ("config.json", "generation_config.json"):
        assert (second.directory / name).read_text() == (first.directory / name).read_text()
    assert (first.tensors, first.parameters) == (180, sum(t.numel() for t in release.state_dict().values()))


def test_bf16_export_of_a_bf16_release_is_the_same_file_content(release, tmp_path, tokenizer_dir):
    directory = write_release(release, tmp_path / "bf16")
    exported = save_release(import_release(directory, tokenizer=tokenizer_dir).model, tmp_path / "out")
    assert_same_tensors(read_bin(exported.directory / "pytorch_model.bin"), read_bin(directory / "pytorch_model.bin"))
    assert json.loads((exported.directory / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert exported.notes == ["tap layers [0, 1, 2, 3]: the reference always taps openai/whisper-large-v3's",
                              "8 acoustic queries: the reference always builds 64"]


# -- bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("semantic_connector.linear_connector.2.weight"),
         "missing ['semantic_connector.linear_connector.2.weight']"),
        (lambda s: s.update({"acoustic_connector.layer_prompts.4": torch.zeros(1, 8, 32)}),
         "unexpected ['acoustic_connector.layer_prompts.4']"),
        (lambda s: s.update({"acoustic_connector.layer_weights": torch.zeros(8, 3)}),
         "['acoustic_connector.layer_weights: (8, 3) in the file vs (8, 4) from config.json']"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_a_release_that_does_not_match_its_config_is_refused_by_name(release, tmp_path, tokenizer_dir, edit, message):
    state = release.state_dict()
    edit(state)
    directory = write_release(release, tmp_path / "broken", state=state)
    with pytest.raises(CheckpointError) as err:
        import_release(directory, tokenizer=tokenizer_dir)
    assert str(err.value).startswith(f"{directory / 'pytorch_model.bin'}: does not match")
    assert message in str(err.value)


def test_a_folder_that_is_not_a_release_is_refused(tmp_path, checkpoint):
    assert not is_release_dir(checkpoint) and not is_release_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a DIFFA-2 release folder"):
        import_release(checkpoint)


def test_a_release_without_a_tokenizer_needs_one(release, tmp_path):
    directory = write_release(release, tmp_path / "release")
    with pytest.raises(CheckpointError, match="holds no tokenizer; pass the LLaDA tokenizer folder"):
        load_pretrained(directory)


# -- load_pretrained and the command line ------------------------------------------------------------------


def test_load_pretrained_and_audio_qa_accept_a_release_folder(chat, fp32_dir):
    assert is_release_dir(fp32_dir)
    model = load_pretrained(fp32_dir)
    assert torch.equal(logits(model, chat), logits(import_release(fp32_dir).model, chat))
    qa = AudioQA.from_checkpoint(fp32_dir)
    assert qa.model.config.compat == "reference" and len(qa.chat.tokenizer) == len(chat.tokenizer)


@pytest.fixture
def bases_and_release(tmp_path, chat, tokenizer_dir):
    """Tiny Whisper and LLaDA folders, and a bf16 release whose base copies are those folders' weights."""
    whisper = write_tiny_hf_whisper(tmp_path / "whisper", d_model=32, layers=4, heads=4, max_source_positions=100)
    llada = tmp_path / "llada"
    llm = write_tiny_llada(llada, vocab=len(chat.tokenizer), mask_id=chat.ids.mask, eos_id=chat.ids.eos)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, llada / file.name)
    encoder = {k.removeprefix("model.encoder."): v for k, v in load_file(whisper / "model.safetensors").items()
               if k.startswith("model.encoder.")}
    release = make_tiny_release(llm_config=llm, whisper_config=WhisperConfig.from_pretrained(whisper).to_dict(),
                                whisper=encoder, llada=tiny_llada_state_dict(llm, seed=0))
    return whisper, llada, write_release(release, tmp_path / "release")


def test_convert_official_then_export_official_reproduces_the_release(chat, tmp_path, bases_and_release, capsys):
    whisper, llada, source = bases_and_release
    assert main(["official", "--src", str(source), "--whisper", str(whisper), "--llada", str(llada),
                 "--out", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "whisper_model.*: 67 tensors identical to --whisper (at bfloat16)" in printed
    assert "llm_model.* base: 21 tensors identical to --llada (at bfloat16)" in printed
    assert "LoRA kept (r 8, alpha 16)" in printed
    checkpoint = load_pretrained(tmp_path / "ckpt")
    assert checkpoint.config.encoder_source == str(whisper.resolve())
    assert checkpoint.config.tokenizer_source == "tokenizer"
    direct = import_release(source, whisper=whisper, llada=llada, tokenizer=llada).model
    assert torch.equal(logits(checkpoint, chat), logits(direct, chat))

    assert main(["export-official", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    assert "180 tensors" in capsys.readouterr().out
    assert_same_tensors(read_bin(tmp_path / "export" / "pytorch_model.bin"), read_bin(source / "pytorch_model.bin"))
    assert (tmp_path / "export" / "tokenizer_config.json").is_file()  # beside the weights, as train.py saves it


@pytest.mark.parametrize("command", ["official", "export-official"])
def test_convert_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
