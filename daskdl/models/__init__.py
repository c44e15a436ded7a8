"""Reference models by name. Input shape and output count come from the data; any callable
``factory(input_shape, n_classes) -> nn.Module`` works wherever a name does.

``n_classes`` is the number of outputs the model needs: one per class (classification), per
label (multi-label) or per target (regression: 1 for targets of shape (n,))."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

ModelSpec = str | tuple[str, dict] | Callable[..., nn.Module]


def mlp(
    input_shape: tuple[int, ...],
    n_classes: int,
    hidden: int = 128,
    categorical: list[list[int]] | None = None,
) -> nn.Module:
    """Two hidden layers on the flattened input. With ``categorical`` (``[[feature index,
    number of codes], ...]``, which ``fit`` fills in for a data set with categorical columns)
    each categorical feature is embedded (``min(50, (codes + 1) // 2)`` dimensions, the
    fast.ai rule) and joined with the numeric ones: the standard tabular network."""
    d = math.prod(input_shape)
    if categorical:
        return _TabularMLP(d, n_classes, hidden, categorical)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


class _TabularMLP(nn.Module):
    def __init__(self, d: int, n_outputs: int, hidden: int, categorical: list[list[int]]):
        super().__init__()
        columns = [int(i) for i, _ in categorical]
        if len(set(columns)) != len(columns) or not all(0 <= i < d for i in columns):
            raise ValueError(f"categorical names feature indices out of 0..{d - 1}: {columns}.")
        self.register_buffer("cat_index", torch.tensor(columns, dtype=torch.long))
        numeric = [i for i in range(d) if i not in columns]
        self.register_buffer("num_index", torch.tensor(numeric, dtype=torch.long))
        embeddings = [nn.Embedding(int(n), min(50, (int(n) + 1) // 2)) for _, n in categorical]
        self.embeddings = nn.ModuleList(embeddings)
        width = len(numeric) + sum(e.embedding_dim for e in embeddings)
        self.cat_index: torch.Tensor
        self.num_index: torch.Tensor
        self.body = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        codes = x.index_select(1, self.cat_index).long()
        parts = [x.index_select(1, self.num_index)]
        parts += [embed(codes[:, j]) for j, embed in enumerate(self.embeddings)]
        return self.body(torch.cat(parts, dim=1))


def small_cnn(input_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """Three 3x3 convolutions and a linear head; no batch norm, so 1 rank and N ranks agree."""
    channels = _image_channels("small_cnn", input_shape)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * width, n_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stem without max pooling (11,173,962 parameters for
    CIFAR-10)."""

    def __init__(self, channels: int = 3, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def resnet18(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return ResNet18(_image_channels("resnet18", input_shape), n_classes)


_VGG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


def _vgg(name: str, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """VGG with batch norm; pooling stops once the feature map is 1x1, so small images work."""
    c_in = _image_channels(name, input_shape)
    size = min(input_shape[1:])
    layers: list[nn.Module] = []
    for v in _VGG[name]:
        if v == "M":
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        width = int(v)  # a layer's channels (the rest are "M", a pooling)
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers)


def vgg11(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return _vgg("vgg11", input_shape, n_classes)


def vgg16(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return _vgg("vgg16", input_shape, n_classes)


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(
            f"{name} needs images shaped (channels, height, width) per sample, got "
            f"{tuple(input_shape)}. Use model='mlp' for tabular data, or reshape X to "
            "(n, C, H, W)."
        )
    return input_shape[0]


def _token_length(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ValueError(
            f"{name} needs token ids shaped (seq_len,) per sample, got {tuple(input_shape)}. "
            "Make them with Dataset.from_text or Dataset.from_corpus."
        )
    return input_shape[0]


def _needs_vocab(name: str, vocab_size: int | None) -> int:
    if not vocab_size or vocab_size < 3:
        raise ValueError(
            f"{name} needs the vocabulary size: model=({name!r}, {{'vocab_size': len(vocab)}})."
        )
    return vocab_size


def fasttext(
    input_shape: tuple[int, ...], n_classes: int, vocab_size: int | None = None, dim: int = 64
) -> nn.Module:
    """fastText: the mean of the words' embeddings (padding left out), then a linear layer."""
    _token_length("fasttext", input_shape)
    return _FastText(_needs_vocab("fasttext", vocab_size), dim, n_classes)


class _FastText(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_classes: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.long()))


class _TransformerClassifier(nn.Module):
    def __init__(self, vocab_size, seq_len, n_classes, dim, heads, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(seq_len, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        pad = ids == 0
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def transformer(
    input_shape: tuple[int, ...],
    n_classes: int,
    vocab_size: int | None = None,
    dim: int = 64,
    heads: int = 4,
    layers: int = 2,
) -> nn.Module:
    """A small Transformer encoder over token ids, mean-pooled (padding left out), classifying."""
    seq_len = _token_length("transformer", input_shape)
    return _TransformerClassifier(
        _needs_vocab("transformer", vocab_size), seq_len, n_classes, dim, heads, layers
    )


class _GRULanguageModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x.long()))
        return self.head(out[:, -1])


def gru_lm(
    input_shape: tuple[int, ...], n_classes: int, vocab_size: int | None = None, dim: int = 128
) -> nn.Module:
    """A next-word language model: a GRU over the window, the next word from its last state.
    ``n_classes`` is the vocabulary size; its validation loss gives the perplexity."""
    _token_length("gru_lm", input_shape)
    return _GRULanguageModel(vocab_size or n_classes, dim, n_classes)


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "fasttext": fasttext,
    "transformer": transformer,
    "gru_lm": gru_lm,
}


def check(spec: ModelSpec) -> bool:
    """What can be checked of a model spec without building it: a known name, or a factory
    that can be called the way daskdl calls one. Returns whether it is a user factory."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        spec = spec[0]
    if isinstance(spec, str):
        if spec not in REGISTRY:
            raise ValueError(f"Unknown model {spec!r}; choose one of {sorted(REGISTRY)}.")
        return False
    if isinstance(spec, nn.Module):
        raise TypeError(
            "Pass a function that builds the model, not a model instance: every rank builds "
            "its own replica. HINT: daskdl.fit(client, lambda: MyNet(), ...)."
        )
    if not callable(spec):
        raise TypeError(f"model must be a name or a callable returning nn.Module, got {spec!r}.")
    factory_takes_shape(spec)
    return True


def build(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Instantiate a model by name, ``(name, options)``, or call a user factory.

    A factory may take ``(input_shape, n_classes)`` or no arguments. Options are keyword
    arguments of the named model, such as ``("fasttext", {"vocab_size": len(vocab)})``.
    """
    if not check(spec):  # a registered name, or (name, options)
        name, options = (spec, {}) if isinstance(spec, str) else cast(tuple[str, dict], spec)
        return REGISTRY[name](tuple(input_shape), n_classes, **dict(options))
    factory = cast(Callable[..., nn.Module], spec)
    try:
        if factory_takes_shape(factory):
            model = factory(tuple(input_shape), n_classes)
        else:
            model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise FactoryError(
            f"Building the model {describe(spec)} for samples of shape {tuple(input_shape)} "
            f"and {n_classes} outputs failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"The model factory returned {type(model).__name__}, not nn.Module.")
    return model


def trained(
    spec: ModelSpec, input_shape: tuple[int, ...], n_outputs: int, state: dict
) -> nn.Module:
    """The model ``spec`` with the weights ``state`` (a state dict of numpy arrays), in eval
    mode. Arrays received over the network can be read-only views: those are copied."""
    model = build(spec, input_shape, n_outputs)
    model.load_state_dict(
        {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in state.items()}
    )
    return model.eval()


class FactoryError(ValueError):
    """A user's model factory raised: the message names it, what it was given and its error."""


FACTORY_FORMS = "f() or f(input_shape, n_classes), returning an nn.Module"


def factory_takes_shape(factory: Callable[..., nn.Module]) -> bool:
    """Whether ``factory`` is called as ``f(input_shape, n_classes)`` (else as ``f()``); a
    ``TypeError`` naming the accepted forms when it can be called as neither."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: try it as f(shape, n)
        return True
    if not signature.parameters:
        return False
    for args in (("shape", "n_classes"), ()):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return bool(args)
    name = getattr(factory, "__qualname__", repr(factory))
    raise TypeError(
        f"The model factory {name}{signature} cannot be called the way daskdl calls one: "
        f"{FACTORY_FORMS}. Wrap it, for example model=lambda input_shape, n_classes: "
        f"{name}(...)."
    )


def describe(spec: ModelSpec) -> str:
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        return f"{spec[0]}({', '.join(f'{k}={v!r}' for k, v in dict(spec[1]).items())})"
    return spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
