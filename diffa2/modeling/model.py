"""The composed DIFFA-2 model: features -> Whisper encoder -> adapters -> spliced into the prompt -> dLLM.

Layout of one sequence fed to the backbone (left-padded in a batch, positions counted per row):

    [pad ...][prompt text before slot][speech embeddings][prompt text after slot][answer tokens ...]
    `------------------------ prefix: never masked ------------------------'`-- noised / decoded --'

Every row's answer region starts at the same column, so training and block decoding index it uniformly,
while padding is invisible to attention and positions restart at 0 for each row: a row's logits do not
depend on its batch-mates (tested). The one exception is training with `compat="reference"`, where every row's
semantic span is the batch's longest, as the released DIFFA-2 was trained (docs/reference-compat.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel, WhisperConfig

from diffa2.modeling.adapters import AcousticAdapter, SemanticAdapter
from diffa2.modeling.backbone import LLADA_TO_LLAMA_MODULES, LLaDABackbone
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.encoder import WhisperSpeechEncoder


@dataclass
class SpeechEmbeddings:
    """Speech tokens for the LLM, left-aligned: row i is valid in `embeds[i, :lengths[i]]`."""

    embeds: torch.Tensor  # (B, S_max, D)
    lengths: torch.Tensor  # (B,)

    def spans(self) -> list[torch.Tensor]:
        """Each row's valid speech tokens, `[S_i, D]`."""
        return [self.embeds[i, : int(n)] for i, n in enumerate(self.lengths)]


def join_windows(spans: Sequence[torch.Tensor], counts: Sequence[int]) -> SpeechEmbeddings:
    """Per clip, its `counts[i]` consecutive window spans (`[S_j, D]` each, in order) joined into one span,
    left-aligned and zero-padded to the longest (`long_audio: window`, docs/long-audio.md)."""
    if sum(counts) != len(spans):
        raise ValueError(f"{len(spans)} window spans for {sum(counts)} windows")
    rows, lo = [], 0
    for count in counts:
        rows.append(torch.cat(list(spans[lo : lo + count]), dim=0))
        lo += count
    embeds = rows[0].new_zeros(len(rows), max(r.shape[0] for r in rows), rows[0].shape[1])
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
    return SpeechEmbeddings(embeds, torch.tensor([r.shape[0] for r in rows], device=embeds.device))


@dataclass
class Prefix:
    """The never-masked part of each sequence (prompt with speech spliced in), left-padded."""

    embeds: torch.Tensor  # (B, P, D)
    attention_mask: torch.Tensor  # (B, P) bool, False at padding
    is_text: torch.Tensor  # (B, P) bool, True at prompt-text positions (classifier-free guidance masks them)

    def repeat(self, times: int) -> Prefix:
        """The B rows stacked `times` times: row i·B + b is row b."""
        return Prefix(self.embeds.repeat(times, 1, 1), self.attention_mask.repeat(times, 1),
                      self.is_text.repeat(times, 1))


class DIFFA2Model(PreTrainedModel):
    """Whisper encoder + semantic and acoustic adapters + learned prompts + LLaDA backbone (+ LoRA).

    A transformers `PreTrainedModel`: `from_pretrained` / `save_pretrained` read and write DIFFA-2 checkpoints
    (only the trained tensors, bases from their recorded sources; `diffa2.modeling.checkpoint`) and DIFFA-2
    release folders, so transformers' Trainer saves it like any model.
    """

    config_class = DIFFA2Config
    base_model_prefix = "diffa2"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True

    def __init__(self, config: DIFFA2Config) -> None:
        super().__init__(config)
        config = self.config
        whisper = WhisperConfig(**config.encoder)
        llm_dim = int(config.backbone["d_model"])
        self.encoder = WhisperSpeechEncoder(whisper)
        self.semantic_adapter = SemanticAdapter(whisper.d_model, llm_dim)
        self.acoustic_adapter = AcousticAdapter(
            whisper.d_model,
            llm_dim,
            tap_layers=config.tap_layers,
            num_queries=config.num_queries,
            num_layers=config.qformer_layers,
            num_heads=config.qformer_heads,
            intermediate_size=config.qformer_intermediate,
            dropout=config.qformer_dropout,
        )
        self.prompt_embeddings = nn.Embedding(config.num_prompt_embeddings, llm_dim)
        self.backbone = LLaDABackbone(config.backbone)
        if config.lora is not None:
            self._wrap_lora(config.lora)
        # Every part was initialised at construction exactly as its source model does (Whisper's and Llama's own
        # `post_init`, PyTorch's defaults, the reference's randn queries): mark them so `post_init` keeps those values.
        for module in self.modules():
            module._is_hf_initialized = True
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The construction-time initialisation, for weights transformers materialises later (e.g. from meta)."""
        if isinstance(module, AcousticAdapter):
            module.queries.normal_(0.0, 1.0)  # the reference's `torch.randn` queries
            module.tap_logits.zero_()  # zeros: the taps start equally weighted
        elif isinstance(module, nn.Linear | nn.Conv1d | nn.LayerNorm | nn.Embedding):
            module.reset_parameters()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **kwargs: Any
    ) -> DIFFA2Model:
        """Load a DIFFA-2 checkpoint directory (or a DIFFA-2 release folder, see `diffa2.modeling.release`)."""
        from diffa2.modeling.checkpoint import load_pretrained  # the loader builds this class

        return load_pretrained(path, dtype=dtype, device=device, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        tokenizer: Any = None,
        **_: Any,
    ) -> None:
        """Write the trained tensors, config and tokenizer as a DIFFA-2 checkpoint (what Trainer calls to save).

        Trainer hands in `state_dict` where a distributed engine gathered it (ZeRO-3); other keyword arguments of
        transformers' signature (sharding, safe_serialization) do not apply: checkpoints are one safetensors file.
        """
        if not is_main_process:
            return
        from diffa2.modeling.checkpoint import write_checkpoint_files

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint_files(self, directory, tokenizer, state_dict)

    # -- speech path ------------------------------------------------------------------------------

    @property
    def reference_compat(self) -> bool:
        """Whether the speech path reproduces DIFFA-2's released code (`config.compat`, docs/reference-compat.md)."""
        return self.config.compat == "reference"

    def encode_speech(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> SpeechEmbeddings:
        """Log-mel `[B, n_mels, F]` and real frame counts -> speech tokens for the stage's speech path.

        With `compat="reference"` the Q-Former reads the whole padded window, and in training every row keeps the
        batch's longest semantic span (padding frames included), as the reference's batch-max truncation gives;
        at inference each row keeps its own span, what the reference's batch-1 inference gives.
        """
        enc = self.encoder(input_features, feature_lengths)
        semantic, semantic_lengths = self.semantic_adapter(enc.last_hidden_state, enc.lengths)
        batch = semantic.shape[0]
        if self.reference_compat and self.training:
            semantic_lengths = torch.full_like(semantic_lengths, semantic.shape[1])
        if self.config.uses_acoustic_path:
            lead = self.acoustic_adapter(enc.hidden_states, enc.lengths, mask_padding=not self.reference_compat)
        else:
            lead = self.prompt_embeddings.weight[None].expand(batch, -1, -1)
        # Lead tokens have a fixed count, so [lead ; semantic] is already left-aligned per row.
        return SpeechEmbeddings(torch.cat([lead, semantic], dim=1), lead.shape[1] + semantic_lengths)

    def build_prefix(
        self, prompt_ids: list[list[int]], audio_slots: Sequence[int | Sequence[int]], speech: SpeechEmbeddings
    ) -> Prefix:
        """Splice speech spans into each row's prompt at its audio slot(s), then left-pad the rows.

        A row's slot is an int (one clip) or a list of nondecreasing slots (one per clip, docs/conversations.md);
        `speech` holds one span per clip, rows' clips in order: row 0's, then row 1's, and so on.
        """
        embed = self.backbone.embed
        device = speech.embeds.device
        slots = [[s] if isinstance(s, int) else [int(x) for x in s] for s in audio_slots]
        if len(slots) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(slots)} audio slot entries")
        clips = sum(len(row) for row in slots)
        if clips != speech.embeds.shape[0]:
            raise ValueError(f"the prompts have {clips} audio slots but there are {speech.embeds.shape[0]} speech "
                             "spans")
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        clip = 0
        for i, (ids, row_slots) in enumerate(zip(prompt_ids, slots, strict=True)):
            if any(not 0 <= s <= len(ids) for s in row_slots) or row_slots != sorted(row_slots):
                raise ValueError(f"row {i}: audio slots {row_slots} are not nondecreasing positions within a prompt "
                                 f"of {len(ids)} tokens")
            text = embed(torch.tensor(ids, device=device))
            pieces, flags, start = [], [], 0
            for slot in row_slots:
                sp = speech.embeds[clip, : int(speech.lengths[clip])].to(text.dtype)
                clip += 1
                pieces += [text[start:slot], sp]
                flags += [torch.ones(slot - start, dtype=torch.bool, device=device),
                          torch.zeros(sp.shape[0], dtype=torch.bool, device=device)]
                start = slot
            pieces.append(text[start:])
            flags.append(torch.ones(len(ids) - start, dtype=torch.bool, device=device))
            rows.append((torch.cat(pieces, dim=0), torch.cat(flags)))
        width = max(r.shape[0] for r, _ in rows)
        dim = rows[0][0].shape[1]
        embeds = rows[0][0].new_zeros(len(rows), width, dim)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        is_text = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, (row, text_flags) in enumerate(rows):
            embeds[i, width - row.shape[0] :] = row
            mask[i, width - row.shape[0] :] = True
            is_text[i, width - row.shape[0] :] = text_flags
        return Prefix(embeds, mask, is_text)

    # -- backbone ---------------------------------------------------------------------------------

    def backbone_inputs(
        self, prefix: Prefix, answer_ids: torch.Tensor, answer_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's embeddings `[B, P+G, D]` and attention mask `[B, P+G]` for prefix + answer ids."""
        if answer_mask is None:
            answer_mask = torch.ones_like(answer_ids, dtype=torch.bool)
        embeds = torch.cat([prefix.embeds, self.backbone.embed(answer_ids).to(prefix.embeds.dtype)], dim=1)
        return embeds, torch.cat([prefix.attention_mask, answer_mask.bool()], dim=1)

    def answer_logits(
        self, prefix: Prefix, answer_ids: torch.Tensor, answer_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `[B, G, V]` of the answer region given the prefix and the (partly masked) answer ids."""
        logits = self.backbone(*self.backbone_inputs(prefix, answer_ids, answer_mask))
        return logits[:, prefix.embeds.shape[1] :]

    def unconditional_prefix(self, prefix: Prefix) -> Prefix:
        """The prefix with its prompt text replaced by [MASK] (speech kept), for classifier-free guidance."""
        mask_embed = self.backbone.embed(torch.tensor([self.backbone.mask_token_id], device=prefix.embeds.device))
        embeds = torch.where(prefix.is_text[..., None], mask_embed.to(prefix.embeds.dtype), prefix.embeds)
        return replace(prefix, embeds=embeds)

    def forward(
        self,
        input_features: torch.Tensor,
        feature_lengths: torch.Tensor,
        prompt_ids: list[list[int]],
        audio_slots: Sequence[int | Sequence[int]],
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor | None = None,
        *,
        answers_per_prompt: int = 1,
        window_counts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Answer-region logits for a batch: audio features (one row per clip), prompts, and noised answer ids.

        A prompt with several clips gives a list of slots and takes that many consecutive feature rows
        (`build_prefix`); with one int slot per prompt, feature row b is prompt b's clip. With `window_counts`
        (`long_audio: window`), clip i is `window_counts[i]` consecutive feature rows, its encoder windows, whose
        speech spans are joined into the clip's one span, as `AudioQA.speech` joins them at inference.

        With `answers_per_prompt` k, `answer_ids` holds k·B rows: k stacked blocks of B answers to the same B
        prompts (row i·B + b answers prompt b). The speech and prefix are computed once and shared by the blocks
        (VRPO scores chosen and rejected answers under several masks per prompt in one call).
        """
        speech = self.encode_speech(input_features, feature_lengths)
        if window_counts is not None:
            speech = join_windows(speech.spans(), window_counts)
        prefix = self.build_prefix(prompt_ids, audio_slots, speech)
        if answer_ids.shape[0] != answers_per_prompt * len(prompt_ids):
            raise ValueError(f"{answer_ids.shape[0]} answer rows for {len(prompt_ids)} prompts "
                             f"x {answers_per_prompt} answers per prompt")
        if answers_per_prompt != 1:
            prefix = prefix.repeat(answers_per_prompt)
        return self.answer_logits(prefix, answer_ids, answer_mask)

    # -- LoRA -------------------------------------------------------------------------------------

    def _wrap_lora(self, settings: LoraSettings) -> None:
        unknown = [m for m in settings.target_modules if m not in LLADA_TO_LLAMA_MODULES]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not LLaDA modules {sorted(LLADA_TO_LLAMA_MODULES)}")
        lora = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            bias="none",
            target_modules=[LLADA_TO_LLAMA_MODULES[m] for m in settings.target_modules],
        )
        self.backbone.lm = get_peft_model(self.backbone.lm, lora)

    def add_lora(self, settings: LoraSettings | None = None) -> None:
        """Wrap the backbone with LoRA (stage 3/4); only the LoRA matrices of the backbone then train."""
        if self.config.lora is not None:
            raise ValueError("the backbone already has LoRA")
        settings = settings or LoraSettings()
        self._wrap_lora(settings)
        self.config.lora = settings

    def merge_lora(self) -> None:
        """Fold LoRA into the backbone weights; the merged backbone is then stored in checkpoints."""
        if self.config.lora is None:
            raise ValueError("the backbone has no LoRA to merge")
        self.backbone.lm = self.backbone.lm.merge_and_unload()
        self.config.lora = None
        self.config.backbone_trainable = True

    # -- memory -----------------------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute backbone activations in the backward pass (Trainer's `--gradient_checkpointing`)."""
        self.backbone.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    # -- trainable-parameter policy ---------------------------------------------------------------

    def set_trainable(self, *, encoder: bool, backbone: bool, adapters: bool = True) -> None:
        """Freeze/unfreeze parts; with LoRA, `backbone=False` still trains the LoRA matrices."""
        self.config.encoder_trainable = encoder
        self.config.backbone_trainable = backbone
        self.encoder.requires_grad_(encoder)
        for module in (self.semantic_adapter, self.acoustic_adapter, self.prompt_embeddings):
            module.requires_grad_(adapters)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(backbone or "lora_" in name)
