"""The two speech adapters between the Whisper encoder and the LLM (DIFFA-2; NKU-HLT/DIFFA DIFFA-2/src/subsample.py
`WhisperProjector` and DIFFA-2/src/modeling_DIFFA.py `QformerConnector`).

- `SemanticAdapter`: conv x4 downsampling (50 Hz -> 12.5 Hz) + MLP to the LLM width; carries *what* is said.
- `AcousticAdapter`: a Q-Former over tapped encoder layers; carries *how* it sounds. By default (toolkit) it masks
  padded encoder frames in cross-attention, so a clip's queries do not depend on the silence that pads its window;
  with `mask_padding=False` it attends to every frame of the window, as the reference was trained
  (docs/reference-compat.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

DOWNSAMPLE = 4  # fixed by the stride of the second convolution


class SemanticAdapter(nn.Module):
    """Conv1d(k3) -> GELU -> Conv1d(k3, stride 4, x4 channels) -> Linear -> ReLU -> Linear -> ReLU -> LayerNorm."""

    def __init__(self, encoder_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(encoder_dim, encoder_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(encoder_dim, DOWNSAMPLE * encoder_dim, kernel_size=3, stride=DOWNSAMPLE, padding=1)
        self.act = nn.GELU()
        self.fc1 = nn.Linear(DOWNSAMPLE * encoder_dim, encoder_dim)
        self.fc2 = nn.Linear(encoder_dim, llm_dim)
        self.relu = nn.ReLU()
        self.norm = nn.LayerNorm(llm_dim)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Tokens per clip: the last `length mod 4` frames are dropped, as in the reference."""
        return lengths // DOWNSAMPLE

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T, d]` encoder frames -> (`[B, T//4, D]` embeddings, per-clip token counts `[B]`).

        Output token j reads frames 4j-1..4j+1 of conv1's output, which reads frames up to 4j+2; for every
        j < length//4 that stays inside the clip, so a clip's tokens do not depend on its batch-mates.
        """
        usable = hidden.shape[1] - hidden.shape[1] % DOWNSAMPLE
        x = hidden[:, :usable].transpose(1, 2)  # (B, d, T)
        x = self.act(self.conv1(x))
        x = self.conv2(x).transpose(1, 2)  # (B, T/4, 4d)
        x = self.relu(self.fc2(self.relu(self.fc1(x))))
        return self.norm(x), self.output_lengths(lengths)


class AcousticAdapter(nn.Module):
    """Per-tap learned queries, one shared BERT-style cross-attention encoder, softmax mix over taps."""

    def __init__(
        self,
        encoder_dim: int,
        llm_dim: int,
        tap_layers: list[int],
        num_queries: int,
        num_layers: int = 2,
        num_heads: int = 8,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tap_layers = list(tap_layers)
        self.num_queries = num_queries
        # BertConfig defaults except the sizes (as DeSTA2/DIFFA); is_decoder is required for cross-attention.
        bert = BertConfig(
            hidden_size=encoder_dim,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            add_cross_attention=True,
            is_decoder=True,
        )
        bert._attn_implementation = "sdpa"
        self.queries = nn.Parameter(torch.randn(len(self.tap_layers), num_queries, encoder_dim))
        self.qformer = BertEncoder(bert)
        self.tap_logits = nn.Parameter(torch.zeros(num_queries, len(self.tap_layers)))
        self.norm = nn.LayerNorm(encoder_dim)
        self.proj = nn.Linear(encoder_dim, llm_dim)

    @staticmethod
    def padding_bias(lengths: torch.Tensor, n_taps: int, frames: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive cross-attention mask `[n_taps*B, 1, 1, T]`: 0 on real frames, very negative on padding."""
        frame_is_real = torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        bias = torch.zeros(frame_is_real.shape, dtype=dtype, device=lengths.device)
        bias = bias.masked_fill(~frame_is_real, torch.finfo(dtype).min)
        return bias[:, None, None, :].repeat(n_taps, 1, 1, 1)

    def forward(
        self, hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor, *, mask_padding: bool = True
    ) -> torch.Tensor:
        """Encoder hidden states (all layers, `[B, T, d]` each) and real frame counts -> `[B, Q, D]`; without
        `mask_padding` the queries also read the padding frames (the reference's behaviour)."""
        taps = torch.stack([hidden_states[i] for i in self.tap_layers], dim=0)  # (n_taps, B, T, d)
        n_taps, batch, frames, dim = taps.shape
        bias = self.padding_bias(lengths, n_taps, frames, taps.dtype) if mask_padding else None
        queries = self.queries[:, None].expand(n_taps, batch, self.num_queries, dim)
        out = self.qformer(
            hidden_states=queries.reshape(n_taps * batch, self.num_queries, dim),
            encoder_hidden_states=taps.reshape(n_taps * batch, frames, dim),
            encoder_attention_mask=bias,
            is_causal=False,  # queries attend to each other both ways (is_decoder would make SDPA causal)
        ).last_hidden_state
        out = out.reshape(n_taps, batch, self.num_queries, dim).permute(1, 2, 0, 3)  # (B, Q, n_taps, d)
        weights = self.tap_logits.softmax(dim=-1)  # (Q, n_taps)
        mixed = (out * weights[None, :, :, None]).sum(dim=2)  # (B, Q, d)
        return self.proj(self.norm(mixed))
