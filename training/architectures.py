"""The LSTM architectures, each a small "core": a sequence (B, S, F) -> K output steps (B, K, T).

A core predicts *changes*: relative to the last observed target value (level mode) or the per-step
differences (differenced mode); `training.strategies.Forecaster` turns them into levels and runs the
multi-step strategy. Every core's last layer starts at zero, so an untrained forecaster repeats the last value.

All cores trace to ONNX (opset 17) with a dynamic batch axis: no Python branching on tensor values, batch-sized
tensors are derived from the input (never torch.zeros(batch, ...)).

Training runs a batch as chunks in worker threads (training.train). So that a seed still fixes the result, every
random draw in a core (dropout, teacher forcing) comes from the generator of the chunk its thread is running
(`random_stream`), never from torch's global one: stacked LSTMs run layer by layer (`run_lstm`) to put the
dropout between layers on that generator too.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class CoreConfig:
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.1
    conv_channels: int = 32  # cnn_lstm
    kernel_size: int = 3  # cnn_lstm
    teacher_forcing: float = 1.0  # encoder_decoder: share of decoder steps fed the true previous value in training
    tbptt: int = 0  # many_to_one: backpropagate through the last `tbptt` steps only (0 = all)

    def to_dict(self) -> dict:
        return asdict(self)


_streams = threading.local()


@contextmanager
def random_stream(generator: torch.Generator):
    """Random draws of the cores in this thread come from `generator` inside the block."""
    previous = getattr(_streams, "generator", None)
    _streams.generator = generator
    try:
        yield
    finally:
        _streams.generator = previous


def _generator() -> torch.Generator | None:
    return getattr(_streams, "generator", None)  # None: torch's global generator


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as torch.nn.functional.dropout, drawing from this thread's random stream.

    Each element drops when 16 random bits fall below p * 2^16, four elements per 64-bit draw: a quarter of the
    generator calls of bernoulli_, whose mask cost as much as 10% of a training step at lookback 336."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0
    dropped = round(p * 65536)  # of the 65536 values of 16 bits
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=_generator())
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768  # (x.shape) bool
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


class Dropout(nn.Dropout):
    """nn.Dropout drawing from this thread's random stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def run_lstm(lstm: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """lstm(x, state), computed layer by layer in training so the dropout between layers uses this thread's
    random stream. Inference (and so the ONNX export) calls the module itself."""
    if not (lstm.training and lstm.dropout > 0 and lstm.num_layers > 1):
        return lstm(x, state)
    directions = 2 if lstm.bidirectional else 1
    if lstm.batch_first:
        x = x.transpose(0, 1)  # time-major between the layers, as oneDNN computes: no layout copy per layer
    if state is None:
        zeros = x.new_zeros(lstm.num_layers * directions, x.shape[1], lstm.hidden_size)
        state = (zeros, zeros)
    per_layer = len(lstm._flat_weights) // lstm.num_layers
    h_n, c_n = [], []
    for layer in range(lstm.num_layers):
        rows = slice(layer * directions, (layer + 1) * directions)
        weights = lstm._flat_weights[layer * per_layer : (layer + 1) * per_layer]
        x, h, c = torch.lstm(x, (state[0][rows], state[1][rows]), weights, lstm.bias, 1, 0.0, True,
                             lstm.bidirectional, False)
        h_n.append(h)
        c_n.append(c)
        if layer + 1 < lstm.num_layers:
            x = dropout(x, lstm.dropout, True)
    return (x.transpose(0, 1) if lstm.batch_first else x), (torch.cat(h_n), torch.cat(c_n))


def _head(hidden: int, out: int, dropout: float) -> nn.Sequential:
    head = nn.Sequential(Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out))
    nn.init.zeros_(head[-1].weight)  # start at "no change"
    nn.init.zeros_(head[-1].bias)
    return head


class Core(nn.Module):
    """Shared constructor arguments: input features, target count, output steps."""

    def __init__(self, n_features: int, n_targets: int, out_steps: int, cfg: CoreConfig):
        super().__init__()
        self.n_features, self.n_targets, self.out_steps = n_features, n_targets, out_steps

    def _steps(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(-1, self.out_steps, self.n_targets)  # (B, K, T)


class ManyToOne(Core):
    """LSTM over the window; the last hidden state -> all K steps (the classic forecaster)."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        self.tbptt = cfg.tbptt
        self.lstm = nn.LSTM(n_features, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.head = _head(cfg.hidden_size, out_steps * n_targets, cfg.dropout)

    def forward(self, seq: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        # seq: (B, S, F)
        if self.training and 0 < self.tbptt < seq.shape[1] and torch.is_grad_enabled():
            # Truncated BPTT: the whole window runs forward, gradients flow through the last `tbptt` steps.
            state = None
            prefix = seq[:, : -self.tbptt]  # (B, S - tbptt, F)
            with torch.no_grad():
                for i in range(0, prefix.shape[1], self.tbptt):  # in chunks: only one chunk's outputs in memory
                    _, state = run_lstm(self.lstm, prefix[:, i : i + self.tbptt], state)
            encoded, _ = run_lstm(self.lstm, seq[:, -self.tbptt :], state)  # (B, tbptt, hidden)
        else:
            encoded, _ = run_lstm(self.lstm, seq)  # (B, S, hidden)
        return self._steps(self.head(encoded[:, -1]))  # (B, K, T)


class ManyToMany(Core):
    """Sequence output: the LSTM runs on over K future slots (zero input + a "future" flag) and a per-step
    (time-distributed) head reads the K outputs."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        self.lstm = nn.LSTM(n_features + 1, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.head = _head(cfg.hidden_size, n_targets, cfg.dropout)

    def forward(self, seq, teacher=None):
        past = torch.cat([seq, seq[:, :, :1] * 0], dim=2)  # (B, S, F+1), flag 0
        future = (past[:, -1:, :] * 0).expand(-1, self.out_steps, -1)  # (B, K, F+1), zeros
        future = torch.cat([future[:, :, :-1], future[:, :, -1:] + 1], dim=2)  # flag 1
        encoded, _ = run_lstm(self.lstm, torch.cat([past, future], dim=1))  # (B, S+K, hidden)
        return self.head(encoded[:, -self.out_steps :])  # (B, K, T)


class Stacked(Core):
    """Separately built LSTM layers with layer norm, dropout and residual connections between them."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        layers = max(cfg.num_layers, 2)
        self.layers = nn.ModuleList(nn.LSTM(n_features if i == 0 else cfg.hidden_size, cfg.hidden_size, batch_first=True)
                                    for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden_size) for _ in range(layers))
        self.drop = Dropout(cfg.dropout)
        self.head = _head(cfg.hidden_size, out_steps * n_targets, cfg.dropout)

    def forward(self, seq, teacher=None):
        h = seq  # (B, S, F)
        for i, (lstm, norm) in enumerate(zip(self.layers, self.norms)):
            out, _ = lstm(h)  # (B, S, hidden)
            out = norm(self.drop(out))
            h = out if i == 0 else h + out  # residual from the second layer on
        return self._steps(self.head(h[:, -1]))  # (B, K, T)


class Bidirectional(Core):
    """Bidirectional LSTM: the forward direction's last state and the backward direction's state at the
    oldest sample (both summarise the whole window) -> all K steps."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        self.hidden = cfg.hidden_size
        self.lstm = nn.LSTM(n_features, cfg.hidden_size, cfg.num_layers, batch_first=True, bidirectional=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.head = _head(2 * cfg.hidden_size, out_steps * n_targets, cfg.dropout)

    def forward(self, seq, teacher=None):
        encoded, _ = run_lstm(self.lstm, seq)  # (B, S, 2 * hidden)
        summary = torch.cat([encoded[:, -1, : self.hidden], encoded[:, 0, self.hidden :]], dim=1)  # (B, 2 * hidden)
        return self._steps(self.head(summary))  # (B, K, T)


class EncoderDecoder(Core):
    """Seq2seq: the encoder's final state starts a decoder that emits one step at a time, fed its previous
    output (free running) or, in training, the true previous value with probability `teacher_forcing`."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        self.teacher_forcing = cfg.teacher_forcing
        drop = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.encoder = nn.LSTM(n_features, cfg.hidden_size, cfg.num_layers, batch_first=True, dropout=drop)
        self.decoder = nn.LSTM(n_targets, cfg.hidden_size, cfg.num_layers, batch_first=True, dropout=drop)
        self.out = _head(cfg.hidden_size, n_targets, cfg.dropout)

    def forward(self, seq, teacher=None):
        _, state = run_lstm(self.encoder, seq)  # (layers, B, hidden) x 2
        step_in = seq[:, -1:, : self.n_targets] * 0  # (B, 1, T): "no change yet"
        outputs = []
        for k in range(self.out_steps):
            decoded, state = run_lstm(self.decoder, step_in, state)  # (B, 1, hidden)
            pred = self.out(decoded)  # (B, 1, T)
            outputs.append(pred)
            if teacher is not None and self.training and self.teacher_forcing > 0:
                draw = torch.rand(pred[:, :, :1].shape, generator=_generator())  # (B, 1, 1)
                use_truth = (draw < self.teacher_forcing).to(pred.dtype)
                step_in = use_truth * teacher[:, k : k + 1] + (1 - use_truth) * pred
            else:
                step_in = pred
        return torch.cat(outputs, dim=1)  # (B, K, T)


class CnnLstm(Core):
    """Two 1-D convolutions (local patterns) and a max-pool halve the sequence before the LSTM."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        k = cfg.kernel_size
        self.conv = nn.Sequential(nn.Conv1d(n_features, cfg.conv_channels, k, padding=k // 2), nn.ReLU(),
                                  nn.Conv1d(cfg.conv_channels, cfg.conv_channels, k, padding=k // 2), nn.ReLU(),
                                  nn.MaxPool1d(2, ceil_mode=True))
        self.lstm = nn.LSTM(cfg.conv_channels, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.head = _head(cfg.hidden_size, out_steps * n_targets, cfg.dropout)

    def forward(self, seq, teacher=None):
        feats = self.conv(seq.transpose(1, 2))  # (B, C, ceil(S / 2))
        encoded, _ = run_lstm(self.lstm, feats.transpose(1, 2))  # (B, S', hidden)
        return self._steps(self.head(encoded[:, -1]))  # (B, K, T)


class Attention(Core):
    """LSTM with additive attention over all its outputs, queried by the last one. The weights of the latest
    call are kept in `last_attention` (B, S) for inspection; `forward_with_attention` returns them."""

    def __init__(self, n_features, n_targets, out_steps, cfg: CoreConfig):
        super().__init__(n_features, n_targets, out_steps, cfg)
        h = cfg.hidden_size
        self.lstm = nn.LSTM(n_features, h, cfg.num_layers, batch_first=True, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.keys = nn.Linear(h, h, bias=False)
        self.query = nn.Linear(h, h)
        self.energy = nn.Linear(h, 1, bias=False)
        self.head = _head(2 * h, out_steps * n_targets, cfg.dropout)
        self.last_attention: torch.Tensor | None = None

    def forward_with_attention(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, _ = run_lstm(self.lstm, seq)  # (B, S, h)
        last = encoded[:, -1]  # (B, h)
        scores = self.energy(torch.tanh(self.keys(encoded) + self.query(last).unsqueeze(1))).squeeze(2)  # (B, S)
        weights = torch.softmax(scores, dim=1)  # (B, S)
        context = torch.bmm(weights.unsqueeze(1), encoded).squeeze(1)  # (B, h)
        return self._steps(self.head(torch.cat([context, last], dim=1))), weights  # (B, K, T), (B, S)

    def forward(self, seq, teacher=None):
        out, weights = self.forward_with_attention(seq)
        self.last_attention = weights.detach()
        return out


ARCHITECTURES: dict[str, type[Core]] = {
    "many_to_one": ManyToOne,
    "many_to_many": ManyToMany,
    "stacked": Stacked,
    "bidirectional": Bidirectional,
    "encoder_decoder": EncoderDecoder,
    "cnn_lstm": CnnLstm,
    "attention": Attention,
}


def build_core(name: str, n_features: int, n_targets: int, out_steps: int, cfg: CoreConfig) -> Core:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](n_features, n_targets, out_steps, cfg)
