"""`load_pretrained`: a run's pretrained encoder in the user's own network (new head, new input channels).

    from rayssl import load_pretrained
    net, report = load_pretrained("runs/<name>", out_channels=14, in_channels=4)
    print(report)  # what was loaded, adapted to 4 input channels, and freshly initialised

The network is the one the model card names (MONAI BasicUNet, SwinUNETR, a MONAI ResNet, or a
method's own encoder) with the card's arguments, overridden by `out_channels`, `in_channels` and
any other `network_kwargs`. Pretrained tensors load by key group: every key of the card's `encoder`
group must load with its exported shape (else ValueError naming the key), the stem is adapted to
`in_channels` as `rayssl export --in-channels` does (weights repeated along the input axis and
scaled by 1/N), pretrained keys outside the encoder whose shape changed (a task head) and keys
the method never pretrained start from the network's own seeded initialisation.

`out_channels` is the size of the network's task output: BasicUNet's `final_conv`, SwinUNETR's
`out` (segmentation classes); for a MONAI ResNet the `fc` classifier (`num_classes`,
`feed_forward=True`); for an encoder whose constructor has no output size (DrasCLR's Loc-CondConv
encoder) a Linear head on its representation (`EncoderWithHead`, the export's keys under
`backbone.`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rayssl.checkpoint import load_export_folder
from rayssl.nn.backbones import Backbone, build_named, import_network

_CARD = "model_card.json"
# Names a network's constructor gives its input-channel count.
_CHANNEL_KWARGS = ("in_channels", "n_input_channels")


def adapt_in_channels(network: str, network_kwargs: dict[str, Any], state: dict[str, torch.Tensor],
                      in_channels: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """Weights for `in_channels` input channels from 1-channel weights: each stem weight's input axis
    is repeated N times and scaled by 1/N, so an input whose N channels are equal gives the same
    activations as the 1-channel network. Returns (network_kwargs, state, adapted keys)."""
    channel_key = next((k for k in _CHANNEL_KWARGS if k in network_kwargs), None)
    if channel_key is None:
        raise ValueError(f"{network} takes no input-channel argument ({' / '.join(_CHANNEL_KWARGS)}); "
                         f"in_channels (--in-channels) cannot adapt it")
    current = int(network_kwargs[channel_key])
    if in_channels == current:
        return dict(network_kwargs), dict(state), []
    if current != 1:
        raise ValueError(f"in_channels (--in-channels) adapts 1-channel weights; this export already has {current} channels")
    kwargs = {**network_kwargs, channel_key: int(in_channels)}
    with torch.random.fork_rng(devices=[]):  # only the shapes matter; leave the caller's RNG alone
        target = import_network(network)(**kwargs).state_dict()
    adapted, out = [], dict(state)
    for key, value in state.items():
        want = tuple(target[key].shape)
        if tuple(value.shape) == want:
            continue
        axes = [i for i, (a, b) in enumerate(zip(value.shape, want)) if a != b]
        if len(value.shape) != len(want) or len(axes) != 1 or value.shape[axes[0]] != 1 or want[axes[0]] != in_channels:
            raise ValueError(f"{key}: shape {tuple(value.shape)} cannot become {want} by repeating one input axis")
        out[key] = (value.repeat_interleave(in_channels, dim=axes[0]) / in_channels).contiguous()
        adapted.append(key)
    return kwargs, out, adapted


class EncoderWithHead(nn.Module):
    """An encoder whose constructor has no output size, followed by a Linear head of `out_channels`.

    Built from names so that a model card can name it (`rayssl export --out-channels`): the encoder
    is `network(**network_kwargs)` under `backbone.`, its output (globally average-pooled when it is
    a feature map) goes through `head`.
    """

    def __init__(self, network: str, network_kwargs: dict[str, Any], out_channels: int) -> None:
        super().__init__()
        self.backbone = import_network(network)(**network_kwargs)
        if not isinstance(self.backbone, Backbone):
            raise ValueError(f"{network} has no output-size argument and is no rayssl.nn.backbones.Backbone "
                             f"(whose out_channels gives the head's width): out_channels cannot add a head to it")
        self.head = nn.Linear(int(self.backbone.out_channels), int(out_channels))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        features = self.backbone(*args, **kwargs)
        if features.ndim > 2:
            features = features.flatten(2).mean(dim=2)
        return self.head(features)


@dataclass
class PretrainedReport:
    """What `load_pretrained` put into the network. Keys are the returned network's state_dict keys."""

    source: str
    method: str | None
    step: int | None
    network: str  # what was built: the card's network, or rayssl.pretrained.EncoderWithHead
    network_kwargs: dict[str, Any]
    loaded: list[str]  # keys holding pretrained values (adapted ones included)
    adapted: list[str] = field(default_factory=list)  # stem keys adapted to in_channels (repeated, scaled 1/N)
    reinitialized: list[str] = field(default_factory=list)  # pretrained, outside the encoder, shape changed: fresh init
    initialized: list[str] = field(default_factory=list)  # prefixes of keys never pretrained: fresh init
    prefix: str = ""  # where the export's keys sit in the returned network ("backbone." for EncoderWithHead)

    def __str__(self) -> str:
        lines = [f"{self.method} (step {self.step}) from {self.source} -> {self.network}",
                 f"  loaded: {len(self.loaded)} pretrained tensors",
                 f"  adapted to new input channels: {', '.join(self.adapted) or 'none'}",
                 f"  re-initialised (head shape changed): {', '.join(self.reinitialized) or 'none'}",
                 f"  freshly initialised (not pretrained): {', '.join(self.initialized) or 'none'}"]
        return "\n".join(lines)


@dataclass
class _Export:
    """An export (or a checkpoint turned into the export layout): only the pretrained tensors."""

    source: str
    network: str
    network_kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    key_groups: dict[str, list[str]]
    method: str | None
    step: int | None


def _read_card_export(folder: str, weights: str | None = None) -> _Export:
    card, state, path = load_export_folder(folder, weights)
    return _Export(source=path, network=card["network"], network_kwargs=dict(card["network_kwargs"]), state=state,
                   key_groups=card.get("key_groups", {}), method=card.get("method"), step=card.get("steps"))


def read_pretrained(path: str) -> _Export:
    """The pretrained tensors of a run folder (export/, else its latest checkpoint), an export or bundle
    folder, or a weights file (backbone.pt, model.safetensors, a bundle's models/model.pt) beside its card."""
    path = os.path.abspath(path)
    what = ("give a run folder, its export/ folder, a bundle folder, or a backbone.pt / model.safetensors "
            "beside its model_card.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {what}")
    if os.path.isfile(path):
        folder = os.path.dirname(path)
        for candidate in (folder, os.path.dirname(folder)):  # a bundle's card is one level above models/
            if os.path.exists(os.path.join(candidate, _CARD)):
                return _read_card_export(candidate, weights=path)
        raise FileNotFoundError(f"{path} has no {_CARD} beside it (or in its parent folder): the card names the "
                                f"network the weights belong to; {what}")
    for folder in (path, os.path.join(path, "export")):
        if os.path.exists(os.path.join(folder, _CARD)):
            return _read_card_export(folder)
    from rayssl.checkpoint import complete_checkpoints

    if not complete_checkpoints(path):
        raise FileNotFoundError(f"{path} has no {_CARD}, export/{_CARD} or complete checkpoint_*/ folder: {what}")
    from rayssl.eval.features import load_run_weights

    weights = load_run_weights(path, source="checkpoint")
    return _Export(source=os.path.join(path, weights.source), network=weights.network,
                   network_kwargs=dict(weights.network_kwargs), state=weights.state_dict,
                   key_groups={k: v for k, v in weights.key_groups.items() if k != "initialized"},
                   method=weights.method, step=weights.step)


def _output_kwargs(network_kwargs: dict[str, Any], out_channels: int) -> dict[str, Any] | None:
    """The constructor arguments that give the network `out_channels` outputs; None when it has none."""
    if "out_channels" in network_kwargs:  # BasicUNet, SwinUNETR
        return {"out_channels": int(out_channels)}
    if "feed_forward" in network_kwargs:  # MONAI ResNets: the fc classifier
        return {"num_classes": int(out_channels), "feed_forward": True}
    return None


def _prefixes(keys: list[str], every: list[str]) -> list[str]:
    """`keys` as short as possible: a top-level module's prefix when all its keys are in `keys`."""
    chosen, out = set(keys), []
    for top in dict.fromkeys(k.split(".")[0] for k in keys):
        under = [k for k in every if k.split(".")[0] == top]
        out += [f"{top}."] if all(k in chosen for k in under) else [k for k in under if k in chosen]
    return out


def build_pretrained(export: _Export, out_channels: int | None = None, in_channels: int | None = None,
                     seed: int = 0, **network_kwargs: Any) -> tuple[nn.Module, PretrainedReport]:
    """The network of `export` with the overrides applied and the pretrained tensors loaded by key group."""
    network, kwargs, state = export.network, dict(export.network_kwargs), dict(export.state)
    adapted: list[str] = []
    if in_channels is not None:
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}: must be >= 1")
        kwargs, state, adapted = adapt_in_channels(network, kwargs, state, int(in_channels))
    wrap = False
    if out_channels is not None:
        if out_channels < 1:
            raise ValueError(f"out_channels={out_channels}: must be >= 1")
        output = _output_kwargs(kwargs, out_channels)
        wrap = output is None
        kwargs.update(output or {})
    kwargs.update(network_kwargs)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        if wrap:
            torch.manual_seed(seed)
            net: nn.Module = EncoderWithHead(network, kwargs, int(out_channels))  # type: ignore[arg-type]
            built, built_kwargs, prefix = ("rayssl.pretrained.EncoderWithHead",
                                           {"network": network, "network_kwargs": kwargs, "out_channels": int(out_channels)},
                                           "backbone.")
        else:
            net = build_named(network, kwargs, seed)
            built, built_kwargs, prefix = network, kwargs, ""
    target = net.state_dict()
    encoder = tuple(export.key_groups.get("encoder") or [""])
    load, reinitialized, dropped = {}, [], []
    for key, value in state.items():
        name, in_encoder = prefix + key, key.startswith(encoder)
        if name in target and tuple(target[name].shape) == tuple(value.shape):
            load[name] = value
            continue
        if in_encoder:
            have = "no such key" if name not in target else f"shape {tuple(target[name].shape)}"
            raise ValueError(
                f"pretrained encoder tensor {key} {tuple(value.shape)} does not fit {built}({built_kwargs}): "
                f"{have}. Every encoder tensor must load; keep the card's encoder arguments (changed: "
                f"{ {k: v for k, v in kwargs.items() if export.network_kwargs.get(k) != v} })")
        (reinitialized if name in target else dropped).append(name)
    net.load_state_dict(load, strict=False)  # every key in `load` was checked against the network above
    fresh = [k for k in target if k not in load and k not in reinitialized]
    report = PretrainedReport(
        source=export.source, method=export.method, step=export.step, network=built, network_kwargs=built_kwargs,
        loaded=sorted(load), adapted=[prefix + k for k in adapted], reinitialized=sorted(reinitialized + dropped),
        initialized=_prefixes(fresh, list(target)), prefix=prefix)
    return net, report


def load_pretrained(run_or_export: str, out_channels: int | None = None, in_channels: int | None = None,
                    *, seed: int = 0, **network_kwargs: Any) -> tuple[nn.Module, PretrainedReport]:
    """The pretrained encoder of a run in the network its model card names, sized for your task.

    Args:
        run_or_export: a run folder (its export/, else its latest complete checkpoint), an export or
            MONAI bundle folder (`rayssl export --format bundle`), or a weights file (backbone.pt,
            model.safetensors, a bundle's models/model.pt) beside its model_card.json.
        out_channels: outputs of the task layer (see the module docstring); None keeps the card's.
        in_channels: input channels; the stem's 1-channel weights are repeated and scaled by 1/N, so
            N equal channels give what the pretrained network gives on one.
        seed: seed of the fresh initialisation of everything not pretrained.
        **network_kwargs: any other constructor argument of the network (e.g. dropout); arguments
            that change an encoder tensor's shape are refused.

    Returns:
        (network, report): the network on the CPU in train mode, and a `PretrainedReport` of the keys
        loaded, adapted to `in_channels`, re-initialised and freshly initialised (`print(report)`).
    """
    return build_pretrained(read_pretrained(run_or_export), out_channels=out_channels, in_channels=in_channels,
                            seed=seed, **network_kwargs)
