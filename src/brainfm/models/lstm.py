"""LSTM autoencoder of Thomas, Ré & Poldrack (2022) (athms/learning-from-brains,
``src/decoder/autoencoder.py``): a bidirectional LSTM encoder pools a window into one vector,
and a unidirectional LSTM decoder reconstructs the window from it, with teacher forcing.

As in the reference, encoder layers are stacked with residual connections and LayerNorm, the two
directions are averaged, the pooled code is ``tanh(Linear(mean final hidden state))``, and
teacher forcing is drawn once per batch (probability ``teacher_forcing``, 0.5). Each decoder
layer starts from the final hidden state of the matching encoder layer (directions averaged).

``use_checkpoint``: activation checkpointing per LSTM layer (its residual, LayerNorm and dropout
included; every decoder step's layer in free running), training only: a layer keeps its inputs for
backward and runs again there instead of keeping its gates (``torch.utils.checkpoint``,
non-reentrant, dropout masks replayed).

Under ``torch.compile`` the ``nn.LSTM`` layers run eagerly (TorchDynamo skips RNN modules:
``torch._dynamo.config.allow_rnn`` is off, and on it fails on CPU in torch 2.13 with
``aten.mkldnn_rnn_layer``); only the glue between them is compiled.
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.models.backbone import Backbone
from brainfm.models.embedding import TREmbedding
from brainfm.models.transformer import checkpointed


class LSTMAutoencoder(nn.Module, Backbone):
    """Args:
        n_rois: ROIs per TR.
        d_model: LSTM width (paper 768).
        depth: LSTM layers in the encoder and in the decoder (paper 4).
        dropout: dropout between layers.
        teacher_forcing: probability that a training batch is decoded with teacher forcing.
        t_max_s, t_resolution_s: time embedding range and bin width, seconds.
        use_checkpoint: activation checkpointing of every LSTM layer (training only).
        pooling: ``code`` (the autoencoder's code, what its decoder sees; the default), ``mean`` (of the
            last encoder layer's states per TR, directions averaged), or a second-order ``correlation`` /
            ``covariance`` readout of those states (:mod:`brainfm.models.pooling`, options in ``readout``).

    Shapes: ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` s; :meth:`encode` -> pooled ``(B, d)``;
    :meth:`forward` -> reconstruction ``(B, T, n_rois)`` and pooled ``(B, d)``.
    """

    def __init__(
        self,
        n_rois: int,
        d_model: int = 128,
        depth: int = 2,
        dropout: float = 0.1,
        teacher_forcing: float = 0.5,
        t_max_s: float = 300.0,
        t_resolution_s: float = 0.2,
        use_checkpoint: bool = False,
        pooling: str = "code",
        readout: dict | None = None,
    ) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        self.d_model = int(d_model)
        self.teacher_forcing = float(teacher_forcing)
        self.use_checkpoint = bool(use_checkpoint)
        self.embedding = TREmbedding(n_rois, d_model, t_max_s, t_resolution_s)
        self.encoder = nn.ModuleList(nn.LSTM(d_model, d_model, batch_first=True, bidirectional=True) for _ in range(depth))
        self.encoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth - 1))
        self.pooler = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh())
        self.decoder = nn.ModuleList(nn.LSTM(d_model, d_model, batch_first=True) for _ in range(depth))
        self.decoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth - 1))
        self.decoder_out = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, self.n_rois)
        self.drop = nn.Dropout(dropout)
        self.init_pooling(pooling, readout, self.d_model, self.n_rois)

    @property
    def out_dim(self) -> int:
        return self.pooled_dim(self.d_model)

    poolings = ("code", "mean", "correlation", "covariance")

    #: ``forward`` returns the reconstruction of its input (``task=autoencoder``'s contract)
    reconstructs = True
    any_tr = True  # TREmbedding: any TR

    def features(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, n_rois)``, ``t`` ``(B, T)`` s -> the pooled code as one token ``(B, 1, d)``
        with ``pooling=code`` (the code is what the decoder sees), else the last encoder layer's states
        ``(B, T, d)`` (:meth:`frame_features`). No token hook: :attr:`token_dim` is ``None``."""
        if self.pooling == "code":
            return self.encode(bold, t)[0][:, None]
        return self.frame_features(bold, t)

    def frame_features(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The last encoder layer's states per TR ``(B, T, d)`` (the two directions averaged)."""
        return self.encode(bold, t, states=True)[2]

    def pool_first_order(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``code``: the autoencoder's code ``(B, d)`` (:meth:`encode`); ``mean``: the mean over TRs of
        :meth:`frame_features`."""
        if self.pooling == "code":
            return self.encode(bold, t)[0]
        return self.frame_features(bold, t).mean(dim=1)

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: the whole autoencoder (the autoencoding objective
        calls ``forward``); its ``nn.LSTM`` layers stay eager (module docstring)."""
        return [self]

    @torch.compiler.disable
    def _layer(self, fn, *args):
        """``fn(*args)`` (one LSTM layer), under activation checkpointing when ``use_checkpoint`` and
        training. Never traced by ``torch.compile``: TorchDynamo cannot trace ``nn.LSTM`` (module
        docstring), and tracing the frames around it only recompiled them for every call signature
        (encoder/decoder, teacher forcing, free running) until the recompile limit."""
        return checkpointed(fn, *args, enabled=self.use_checkpoint and self.training)

    def _encoder_layer(self, i: int, x: torch.Tensor, prev: torch.Tensor | None):
        """Layer ``i`` of the encoder on ``(B, T, d)``: ``(out (B, T, d), directions averaged; final hidden
        (1, B, d), directions averaged; the layer's input after residual/LayerNorm/dropout)``."""
        if i > 0:
            x = self.drop(self.encoder_norms[i - 1](x + prev))
        out, (h, _) = self.encoder[i](x)
        return 0.5 * (out[..., : self.d_model] + out[..., self.d_model :]), h.mean(dim=0, keepdim=True), x

    def encode(self, bold: torch.Tensor, t: torch.Tensor, states: bool = False):
        """Pooled code ``(B, d)`` and each layer's final hidden state ``(1, B, d)``; with ``states``, also the
        last encoder layer's states per TR ``(B, T, d)`` (directions averaged)."""
        x = self.drop(self.embedding(bold, t))
        finals = []
        prev = None
        for i in range(len(self.encoder)):
            out, h, x = self._layer(self._encoder_layer, i, x, prev)
            prev, x = x, out
            finals.append(h)
        code = self.pooler(self.drop(finals[-1][0]))
        return (code, finals, x) if states else (code, finals)

    def _decoder_layer(self, i: int, x: torch.Tensor, prev: torch.Tensor | None, h: torch.Tensor, c: torch.Tensor):
        """Layer ``i`` of the decoder from state ``(h, c)`` (each ``(1, B, d)``): ``(out, (h, c), its input)``."""
        if i > 0:
            x = self.drop(self.decoder_norms[i - 1](x + prev))
        out, state = self.decoder[i](x, (h, c))
        return out, state, x

    def _decoder_step(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        prev, new_state = None, []
        for i in range(len(self.decoder)):
            out, s, x = self._layer(self._decoder_layer, i, x, prev, *state[i])
            new_state.append(s)
            prev, x = x, out
        return self.decoder_out(self.drop(x)), new_state

    @torch.compiler.disable
    def _draw_teacher_forcing(self) -> bool:
        """One draw per training batch from the global generator, on the host (a deliberate graph
        break under ``torch.compile``: inside a compiled graph the draw would come from the compiler's
        own random stream and the decision would differ from an eager run's)."""
        return bool(torch.rand(()) < self.teacher_forcing)

    def forward(self, bold: torch.Tensor, t: torch.Tensor, teacher_forcing: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = bold.shape
        pooled, finals = self.encode(bold, t)
        state = [(h, torch.zeros_like(h)) for h in finals]
        if teacher_forcing is None:  # drawn after the encoder's dropout, as always (the same random stream)
            teacher_forcing = self.training and self._draw_teacher_forcing()
        if teacher_forcing:  # one call: inputs are the code, then the true TRs 0..T-2
            targets = self.embedding(bold, t)
            inputs = torch.cat([pooled[:, None], targets[:, :-1]], dim=1)
            out, _ = self._decoder_step(inputs, state)
        else:  # free running: each step's output is the next step's input
            step, outs = pooled[:, None], []
            for _ in range(n):
                step, state = self._decoder_step(step, state)
                outs.append(step)
            out = torch.cat(outs, dim=1)
        return self.head(out), pooled
