"""Multi-turn, multi-clip conversations: chat format, splicing, batching, AudioQA (docs/conversations.md)."""

from __future__ import annotations

import pytest
import torch
from helpers import clip

from diffa2.audio import LogMelFeaturizer
from diffa2.chat import AudioRef, Conversation, Turn, turns_from_messages
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.inference import AudioQA

TWO_CLIPS = Conversation((
    Turn("user", (AudioRef(), "What is the pitch?")),
    Turn("assistant", ("high",)),
    Turn("user", ("And this one?", AudioRef(), "Which clip is louder?")),
))


def featurize(model, waves):
    return LogMelFeaturizer(model.config.n_mels, model.config.window_seconds)(waves)


def test_single_clip_conversation_is_the_classic_prompt(chat):
    question = "  How many beeps are there? "
    ids, slots = chat.encode_conversation(Conversation.single(question))
    assert (ids, slots[0]) == chat.encode_prompt(question)
    assert chat.encode(question) == chat.encode_prompt(question)
    assert len(slots) == 1


def test_conversation_text_and_slots(chat):
    texts = chat.conversation_texts(TWO_CLIPS)
    assert texts == [
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful voice assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThis is the audio:",
        " <audio>. What is the pitch?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhigh<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd this one? This is the audio:",
        " <audio>. Which clip is louder?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    ids, slots = chat.encode_conversation(TWO_CLIPS)
    tok = chat.tokenizer
    assert tok.decode(ids[: slots[0]]) == texts[0]
    assert tok.decode(ids[slots[0] : slots[1]]) == texts[1]
    assert tok.decode(ids[slots[1] :]) == texts[2]


def test_reference_compat_refuses_conversations(chat):
    ref = chat.with_compat("reference")
    assert ref.encode_conversation(Conversation.single("How many?")) == (
        ref.encode_prompt("How many?")[0], [ref.encode_prompt("How many?")[1]])
    with pytest.raises(ValueError, match=r"3 turn\(s\) and 2 clip\(s\): use compat='toolkit'"):
        ref.encode_conversation(TWO_CLIPS)


@pytest.mark.parametrize(("turns", "message"), [
    ((), "at least one turn"),
    ((Turn("user", (AudioRef(), "q")), Turn("assistant", ("a",))), "last turn must be the user turn"),
    ((Turn("assistant", (AudioRef(), "a")), Turn("user", ("q",))), "assistant turn cannot hold audio"),
    ((Turn("user", (" ",)),), "turn 0 (user) is empty"),
    ((Turn("system", ("q",)),), "role must be one of ['user', 'assistant']"),
])
def test_bad_conversations_are_refused(turns, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Conversation(turns)


def test_messages_become_turns():
    turns, system = turns_from_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Pitch?"}]},
        {"role": "assistant", "content": "high"},
        {"role": "user", "content": [{"type": "audio", "audio": "b.wav"}, {"type": "text", "text": "Louder?"}]},
    ])
    assert system == "Be brief."
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert [c.source for t in turns for c in t.clips] == ["a.wav", "b.wav"]
    assert [t.text for t in turns] == ["Pitch?", "high", "Louder?"]
    with pytest.raises(ValueError, match=r"messages\[1\].content\[0\] must be"):
        turns_from_messages([{"role": "user", "content": "q"}, {"role": "user", "content": [{"type": "image"}]}])


def test_two_clips_are_spliced_at_their_placeholders(chat, tiny_model):
    ids, slots = chat.encode_conversation(TWO_CLIPS)
    speech = tiny_model.encode_speech(*featurize(tiny_model, [clip(1.0, 300, seed=1), clip(2.0, 900, seed=2)]))
    prefix = tiny_model.build_prefix([ids], [slots], speech)
    n = speech.lengths.tolist()
    assert prefix.embeds.shape[1] == len(ids) + sum(n)
    text = tiny_model.backbone.embed(torch.tensor(ids))
    first, second = slots[0], slots[1] + n[0]  # the second span sits after the first span's tokens
    torch.testing.assert_close(prefix.embeds[0, first : first + n[0]], speech.embeds[0, : n[0]])
    torch.testing.assert_close(prefix.embeds[0, second : second + n[1]], speech.embeds[1, : n[1]])
    torch.testing.assert_close(prefix.embeds[0, :first], text[: slots[0]])
    torch.testing.assert_close(prefix.embeds[0, first + n[0] : second], text[slots[0] : slots[1]])
    torch.testing.assert_close(prefix.embeds[0, second + n[1] :], text[slots[1] :])
    assert (~prefix.is_text[0]).nonzero().squeeze(1).tolist() == (
        list(range(first, first + n[0])) + list(range(second, second + n[1])))


def test_slots_and_spans_must_agree(chat, tiny_model):
    ids, slots = chat.encode_conversation(TWO_CLIPS)
    speech = tiny_model.encode_speech(*featurize(tiny_model, [clip(1.0)]))
    with pytest.raises(ValueError, match="the prompts have 2 audio slots but there are 1 speech spans"):
        tiny_model.build_prefix([ids], [slots], speech)
    with pytest.raises(ValueError, match=r"row 0: audio slots \[5, 2\] are not nondecreasing"):
        tiny_model.build_prefix([ids], [[5, 2]], tiny_model.encode_speech(*featurize(tiny_model, [clip(1.0)] * 2)))


@pytest.fixture
def qa(chat, tiny_model) -> AudioQA:
    return AudioQA(tiny_model, chat)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_mixed_batch_decodes_as_one_by_one(qa, mode):
    a, b, c = clip(0.8, 300, seed=1), clip(1.5, 900, seed=2), clip(0.6, 600, seed=3)
    follow_up = Conversation((Turn("user", (AudioRef(), "How many beeps?")), Turn("assistant", ("two",)),
                              Turn("user", ("And the pitch?",))))
    waves = [[a, b], c, [b]]
    questions = [TWO_CLIPS, "What is the pitch?", follow_up]
    config = DecodeConfig.preset(mode, gen_length=8, block_length=4, steps=8)
    together = qa.answer(waves, questions, config)
    for i in range(3):
        alone = qa.answer(waves[i : i + 1], questions[i : i + 1], config)
        assert together.token_ids[i].tolist() == alone.token_ids[0].tolist()
    assert qa.answer([c], ["What is the pitch?"], config).token_ids[0].tolist() == together.token_ids[1].tolist()


def test_answer_refuses_a_wrong_clip_count(qa):
    with pytest.raises(ValueError, match=r"row 0: the conversation has 2 clip\(s\) but 1 waveform\(s\) were given"):
        qa.answer([[clip(0.5)]], [TWO_CLIPS])


def test_multi_turn_manifests_train_on_the_last_answer(tmp_path, chat, tiny_model):
    import json

    import soundfile as sf

    from diffa2.data.collate import SFTCollator
    from diffa2.data.dataset import AudioInstructionDataset
    from diffa2.data.recipe import DataSource, load_split

    for name, freq in (("a.wav", 300), ("b.wav", 900)):
        sf.write(tmp_path / name, clip(0.5, freq), 16000)
    records = [
        {"audio_filepath": "a.wav", "input": "What is the pitch?", "target": "low"},
        {"audio_filepath": "a.wav", "conversation": [{"input": "What is the pitch?", "target": "low"},
                                                     {"input": "How many beeps?", "target": "two"}]},
        {"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "low"},
            {"role": "user", "content": [{"type": "audio", "audio": "b.wav"}, {"type": "text", "text": "Higher?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the second"}]}]},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    items, problems = load_split([DataSource(path=str(manifest))], synth_dir=None, seed=0)
    assert problems == [] and len(items) == 3
    examples = [AudioInstructionDataset(items, 30.0)[i] for i in range(3)]
    follow_up = Conversation((Turn("user", (AudioRef(), "What is the pitch?")), Turn("assistant", ("low",)),
                              Turn("user", ("How many beeps?",))))
    two_clips = Conversation((Turn("user", (AudioRef(), "Pitch?")), Turn("assistant", ("low",)),
                              Turn("user", (AudioRef(), "Higher?"))))
    assert [ex.instruction for ex in examples] == ["What is the pitch?", follow_up, two_clips]
    assert [ex.answer for ex in examples] == ["low", "two", "the second"]
    batch = SFTCollator(chat, LogMelFeaturizer(tiny_model.config.n_mels, tiny_model.config.window_seconds))(examples)
    assert batch.input_features.shape[0] == 4  # 1 + 1 + 2 clips
    assert batch.prompt_ids == [chat.encode_prompt("What is the pitch?")[0], chat.encode_conversation(follow_up)[0],
                                chat.encode_conversation(two_clips)[0]]
    assert batch.audio_slots == [chat.encode_prompt("What is the pitch?")[1], chat.encode_conversation(follow_up)[1],
                                 chat.encode_conversation(two_clips)[1]]
    answer = chat.encode_answer("the second")
    assert batch.answer_ids[2, : len(answer)].tolist() == answer
    logits = tiny_model(batch.input_features, batch.feature_lengths, batch.prompt_ids, batch.audio_slots,
                        batch.answer_ids)
    assert logits.shape[:2] == batch.answer_ids.shape


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory):
    from diffa2.data.synth.multiturn import MultiturnSizes, build_multiturn_split

    return build_multiturn_split(tmp_path_factory.mktemp("mt"), seed=3,
                                 sizes=MultiturnSizes(train=10, validation=2, test_per_kind=1))


def test_multiturn_split_contents(multiturn):
    import json

    from diffa2.data.recipe import DataSource, load_split
    from diffa2.data.synth.multiturn import COMPARISONS
    from diffa2.data.synth.questions import QUESTION_KINDS

    test = json.loads(multiturn["test"].read_text())
    assert len(test) == 2 * (len(QUESTION_KINDS) + len(COMPARISONS))  # two turns per conversation, one per kind
    assert [r["turn"] for r in test] == [1, 2] * (len(test) // 2)
    second = [r for r in test if r["turn"] == 2]
    assert sorted(r["sub-category"] for r in second) == sorted([*QUESTION_KINDS, *COMPARISONS])
    for record in second:
        comparison = record["sub-category"] in COMPARISONS
        assert record["choices"] == (["one", "two"] if comparison else record["choices"])
        assert record["answer"] in record["choices"]
        assert len(record["question_audio"]) == int(comparison)
        assert [m["role"] for m in record["history"]] == ["user", "assistant"]
        assert record["history"][0]["content"][0] == {"type": "audio", "audio": record["audio_id"]}
    items, problems = load_split([DataSource(path=str(multiturn["train"]))], synth_dir=None, seed=0)
    assert problems == [] and len(items) == 20  # each conversation once per prefix: 1 and 2 turns
    question, answer, clips = items[1].prompt()
    assert question.user_turns == 2 and answer == json.loads(multiturn["train"].read_text())[1]["messages"][-1][
        "content"]
    assert all((multiturn["train"].parent / c).is_file() for c in clips)


def test_multiturn_split_is_deterministic(multiturn, tmp_path):
    from diffa2.data.synth.multiturn import MultiturnSizes, build_multiturn_split

    again = build_multiturn_split(tmp_path, seed=3, sizes=MultiturnSizes(train=10, validation=2, test_per_kind=1))
    for split, path in multiturn.items():
        assert again[split].read_bytes() == path.read_bytes()


def test_eval_runs_conversation_items_per_turn(multiturn, checkpoint):
    from diffa2.eval.core import evaluate, item_question, load_items, render_prompts
    from diffa2.eval.specs import SPEC_DIR, load_spec

    qa = AudioQA.from_checkpoint(checkpoint)
    spec = load_spec("synth", SPEC_DIR / "synth_multiturn.yaml")
    items, _ = load_items(spec, multiturn["test"], multiturn["test"].parent, limit=6)
    prompts = render_prompts(spec, items)
    asked = [item_question(item, prompt) for item, prompt in zip(items, prompts, strict=True)]
    assert asked[0] == prompts[0] and isinstance(asked[1], Conversation)
    assert [t.role for t in asked[1].turns] == ["user", "assistant", "user"]
    assert asked[1].turns[1].text == items[0].answer  # the gold answer of turn 1
    together = evaluate(qa, spec, items, batch_size=6)
    alone = [evaluate(qa, spec, [item], batch_size=1).entries[0] for item in items]
    assert together.entries == alone
    turns = together.summary["breakdown"]["turn"]
    assert {value: cell["total"] for value, cell in turns.items()} == {"1": 3, "2": 3}


def test_demo_keeps_the_conversation(tmp_path, checkpoint):
    import asyncio

    import soundfile as sf

    from diffa2.audio import load_audio
    from diffa2.demo.answer import ChatTurn, DecodeSettings, answer_clip, conversation_of
    from diffa2.demo.ui import render_history

    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(first, clip(0.6, 300, seed=1), 16000)
    sf.write(second, clip(0.6, 900, seed=2), 16000)
    history = [ChatTurn(str(first), "What is the pitch?", "low"), ChatTurn(str(first), "How many beeps?", "two")]
    clips, asked = conversation_of(history, str(second), "Which clip is higher?")
    assert clips == [str(first), str(second)]
    assert asked == Conversation((Turn("user", (AudioRef(), "What is the pitch?")), Turn("assistant", ("low",)),
                                  Turn("user", ("How many beeps?",)), Turn("assistant", ("two",)),
                                  Turn("user", (AudioRef(), "Which clip is higher?"))))
    assert conversation_of([], str(first), "q") == ([str(first)], "q")  # a first question: the classic prompt
    settings = DecodeSettings(gen_length=8, block_length=8, steps=4)

    async def final(**kwargs):
        return [u async for u in answer_clip(str(second), "Which clip is higher?", str(checkpoint), settings,
                                             **kwargs)][-1]

    last = asyncio.run(final(history=history))
    qa = AudioQA.from_checkpoint(checkpoint)
    waves = [load_audio(p) for p in clips]
    assert last.done and not last.failed
    assert last.text == qa.answer([waves], [asked], settings.to_config()).texts[0]
    assert render_history(history) == ("**1.** 🔊 *a.wav* What is the pitch?  \n→ low\n\n"
                                       "**2.** How many beeps?  \n→ two")


def test_multi_turn_preference_pairs(tmp_path, chat):
    import json

    import soundfile as sf

    from diffa2.data.collate import PairCollator
    from diffa2.data.dataset import PreferenceDataset
    from diffa2.data.recipe import DataSource, load_split

    sf.write(tmp_path / "a.wav", clip(0.5), 16000)
    record = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, "Pitch?"]},
                           {"role": "assistant", "content": "low"}, {"role": "user", "content": "Beeps?"},
                           {"role": "assistant", "content": "two"}], "rejected": "three"}
    (tmp_path / "pref.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "rejected": 3}) + "\n")
    items, problems = load_split([DataSource(path=str(tmp_path / "pref.jsonl"), rejected_field="rejected")],
                                 synth_dir=None, seed=0, on_error="skip")
    assert len(items) == 1 and problems == [f"{tmp_path / 'pref.jsonl'}:2: multi-turn record: field 'rejected' (the "
                                            "rejected answer) must be a string, got 3"]
    pair = PreferenceDataset(items, 30.0)[0]
    assert (pair.chosen, pair.rejected, pair.instruction.user_turns) == ("two", "three", 2)
    batch = PairCollator(chat, LogMelFeaturizer(80, 30.0))([pair])
    assert batch.prompt_ids == [chat.encode_conversation(pair.instruction)[0]]
    for ids, text in ((batch.chosen_ids, "two"), (batch.rejected_ids, "three")):
        answer = chat.encode_answer(text)
        assert ids[0, : len(answer)].tolist() == answer
