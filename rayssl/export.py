"""Exports of a run's backbone that load strictly into the network their card names: MONAI state_dict, MONAI bundle, safetensors.

Every export holds *all* keys of the named network: the pretrained ones, plus the keys the method
does not pretrain (e.g. a U-Net's decoder for an encoder-only method) at the network's own seeded
initialisation, listed in the card under `key_groups["initialized"]`. So
`Network(**network_kwargs).load_state_dict(weights, strict=True)` works for every method, and a
key-name mismatch shows up as an error at export time instead of a silent partial load downstream.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any, Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from rayssl.data.intensity import bundle_input_format

# Rebuilding networks from a card and adapting their input channels live in rayssl.pretrained
# (which load_pretrained shares); re-exported here for the export's callers.
from rayssl.nn.backbones import build_named as build  # noqa: F401 - the export's callers build through it
from rayssl.pretrained import _CHANNEL_KWARGS, _Export, adapt_in_channels, build_pretrained, import_network  # noqa: F401

FORMATS = ("monai", "bundle", "safetensors")
ExportFormat = Literal["monai", "bundle", "safetensors"]


def complete_state(network: str, network_kwargs: dict[str, Any], pretrained: dict[str, torch.Tensor],
                   seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All keys of `network(**network_kwargs)`: the pretrained values, the rest at a seeded init.

    Returns (state, prefixes of the initialised keys). Raises ValueError naming keys the network
    does not have or whose shape differs: such an export would not load.
    """
    reference = build(network, network_kwargs, seed).state_dict()
    unknown = sorted(set(pretrained) - set(reference))
    if unknown:
        raise ValueError(f"{len(unknown)} exported keys do not exist in {network}({network_kwargs}), e.g. "
                         f"{unknown[:3]}: the method's export does not match the network it names")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in pretrained.items()
             if tuple(v.shape) != tuple(reference[k].shape)]
    if wrong:
        raise ValueError(f"exported tensors whose shape differs from {network}: {wrong[:3]}")
    state = {k: (pretrained[k] if k in pretrained else v).detach().cpu().contiguous() for k, v in reference.items()}
    initialized = sorted({k.split(".")[0] + "." for k in reference if k not in pretrained})
    # A prefix may cover pretrained keys too (a shared parent module): then list the keys themselves.
    exact = []
    for prefix in initialized:
        under = [k for k in reference if k.startswith(prefix)]
        exact += [prefix] if all(k not in pretrained for k in under) else [k for k in under if k not in pretrained]
    return state, exact


def load_strict(network: str, network_kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The named network with `state` loaded strictly (raises on any missing or unexpected key)."""
    net = build(network, network_kwargs)
    net.load_state_dict(state, strict=True)
    return net


# ---------------------------------------------------------------------------------------------
# Writers: each builds the export in a scratch folder and moves it into place when complete.
# ---------------------------------------------------------------------------------------------
def _load_line(network: str, weights: str) -> str:
    name = network.rsplit(".", 1)[-1]
    loader = ("safetensors.torch.load_file('model.safetensors')" if weights.endswith(".safetensors")
              else f"torch.load('{weights}', weights_only=True)")
    return f"from {network.rsplit('.', 1)[0]} import {name}; net = {name}(**network_kwargs); " \
           f"net.load_state_dict({loader}, strict=True)"


def fine_tune_line(folder: str) -> str:
    """The model card's fine-tuning snippet (rayssl.load_pretrained) for the export in `folder`."""
    return (f"from rayssl import load_pretrained; net, report = load_pretrained({folder!r}, out_channels=N, "
            f"in_channels=C)  # N task outputs (fresh head), C input channels (stem adapted); print(report)")


def _write_monai(folder: str, state: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    torch.save(state, os.path.join(folder, "backbone.pt"))
    card = {**card, "format": "monai", "weights": "backbone.pt", "load_with": _load_line(card["network"], "backbone.pt")}
    with open(os.path.join(folder, "model_card.json"), "w") as f:
        json.dump(card, f, indent=2, default=str)


def _write_safetensors(folder: str, state: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # safetensors metadata is str -> str: the network and its arguments travel with the weights.
    save_file(state, os.path.join(folder, "model.safetensors"),
              metadata={"network": card["network"], "network_kwargs": json.dumps(card["network_kwargs"]),
                        "method": str(card.get("method"))})
    card = {**card, "format": "safetensors", "weights": "model.safetensors",
            "load_with": _load_line(card["network"], "model.safetensors")}
    with open(os.path.join(folder, "model_card.json"), "w") as f:
        json.dump(card, f, indent=2, default=str)


def bundle_input_shape(network: str, patch: list[int]) -> list[int]:
    """The spatial input shape a bundle declares: the pretraining patch, raised to what the whole
    network accepts. A SwinUNETR pretrained on 32^3 crops (encoder only, deepest pooling) is fine,
    but the full SwinUNETR instance-normalises its 1/32-scale map in `encoder10`, which needs more
    than one voxel: >= 64 and a multiple of 32 (MONAI's verify_net_in_out runs the full network)."""
    if network.endswith(".SwinUNETR"):
        return [max(64, -(-int(p) // 32) * 32) for p in patch]
    if network.endswith(".BasicUNet"):  # 4 poolings; the deepest map is instance/group-normalised
        return [max(32, -(-int(p) // 16) * 16) for p in patch]
    return [int(p) for p in patch]


def _output_channels(kwargs: dict[str, Any]) -> int:
    """Channels of the network's output: its out_channels / num_classes, or a feature-only MONAI
    ResNet's width (512 x widen_factor), or an encoder's representation size (rep_dim)."""
    if "out_channels" in kwargs:
        return int(kwargs["out_channels"])
    if "feed_forward" in kwargs:
        return int(kwargs.get("num_classes", 400)) if kwargs["feed_forward"] else int(512 * kwargs.get("widen_factor", 1.0))
    return int(kwargs.get("rep_dim", 1))


def bundle_metadata(card: dict[str, Any]) -> dict[str, Any]:
    """configs/metadata.json of a MONAI bundle (the fields MONAI's bundle schema and verify_net_in_out read)."""
    import monai
    import numpy

    patch = card.get("pretraining_patch_size") or card.get("pretraining_input_size") or [32, 32, 32]
    if isinstance(patch, int):
        patch = [patch] * 3
    patch = bundle_input_shape(card["network"], patch)
    channels = int(next((card["network_kwargs"][k] for k in _CHANNEL_KWARGS if k in card["network_kwargs"]), 1))
    # From the run's resolved intensity mappings (rayssl.data.intensity), not from the card's text.
    inputs = bundle_input_format(card.get("intensity_resolved"))
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"rayssl {card.get('method')} pretraining, {card.get('steps')} steps"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": ({"rayssl": "0.1.0"} if card["network"].startswith("rayssl.") else {}),
        "task": f"self-supervised pretrained backbone ({card.get('method')}); fine-tune for the downstream task",
        "description": str(card.get("notes") or f"{card.get('method')} pretrained {card['network']}"),
        "authors": "rayssl",
        "copyright": "see the pretraining data's licence",
        "references": [str(card["paper"])] if card.get("paper") else [],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": inputs["format"], "modality": inputs["modality"],
                "num_channels": channels, "spatial_shape": [int(p) for p in patch], "dtype": "float32",
                "value_range": inputs["value_range"], "is_patch_data": True,
                "channel_def": {str(i): "image" for i in range(channels)},
            }},
            "outputs": {"pred": {
                "type": "tensor", "format": "features", "num_channels": _output_channels(card["network_kwargs"]),
                "spatial_shape": [int(p) for p in patch], "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {},
            }},
        },
        "rayssl_card": {k: card[k] for k in ("method", "steps", "key_groups", "in_channels_adapted") if k in card},
    }


def _bundle_readme(card: dict[str, Any]) -> str:
    return f"""# rayssl {card.get('method')} backbone (MONAI bundle)

{card.get('notes', '')}

- network: `{card['network']}` with the arguments in `configs/inference.json` (`network_def`)
- weights: `models/model.pt`, every key of the network (strict load); keys not pretrained by the
  method are at the network's seeded initialisation: {', '.join(card.get('key_groups', {}).get('initialized', [])) or 'none'}
- pretraining: {card.get('steps')} steps; patch {card.get('pretraining_patch_size')}; spacing {card.get('pretraining_spacing_mm')}
- input channels: {card.get('in_channels_adapted', {}).get('in_channels', 1)}

```python
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config("<bundle>/configs/inference.json")
net = parser.get_parsed_content("network"); parser.get_parsed_content("load_weights")  # strict load
```

`bundle_root` in configs/inference.json is the folder the bundle was written to; after moving the
bundle, set `parser["bundle_root"] = "<new folder>"` (MONAI's `--bundle_root`).

Fine-tuning with a task head of N outputs and C input channels (rayssl installed; `rayssl.load_pretrained`):

```python
{card.get("fine_tune_with") or fine_tune_line("<bundle>")}
```
"""


def _write_bundle(folder: str, state: dict[str, torch.Tensor], card: dict[str, Any], bundle_root: str = ".") -> None:
    for sub in ("configs", "models", "docs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    torch.save(state, os.path.join(folder, "models", "model.pt"))
    network_def = {"_target_": card["network"], **card["network_kwargs"]}
    inference = {
        "imports": [f"$import {card['network'].split('.')[0]}", "$import torch"],
        # Where the bundle was written (so load_weights works from any working directory); after
        # moving the bundle, set bundle_root to its new folder (MONAI: --bundle_root).
        "bundle_root": bundle_root,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True), strict=True)",
    }
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(inference, f, indent=2, default=list)
    with open(os.path.join(folder, "configs", "metadata.json"), "w") as f:
        json.dump(bundle_metadata(card), f, indent=2, default=str)
    with open(os.path.join(folder, "docs", "README.md"), "w") as f:
        f.write(_bundle_readme(card))
    with open(os.path.join(folder, "model_card.json"), "w") as f:
        json.dump({**card, "format": "bundle", "weights": "models/model.pt"}, f, indent=2, default=str)


_WRITERS = {"monai": _write_monai, "bundle": _write_bundle, "safetensors": _write_safetensors}


def write_export(out_dir: str, state: dict[str, torch.Tensor], card: dict[str, Any], fmt: ExportFormat = "monai") -> str:
    """Write `state` (every key of card["network"]) and its card to `out_dir` in `fmt`; checks the strict
    load first. Atomic: the folder appears complete or not at all (an earlier export there is replaced)."""
    if fmt not in _WRITERS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    load_strict(card["network"], card["network_kwargs"], state)
    card = {**card, "fine_tune_with": fine_tune_line(out_dir)}
    with tempfile.TemporaryDirectory(prefix="rayssl-export-") as scratch:
        fs, path = fsspec.core.url_to_fs(out_dir)
        local = isinstance(fs, LocalFileSystem)
        extra = {"bundle_root": os.path.abspath(path) if local else "."} if fmt == "bundle" else {}
        _WRITERS[fmt](scratch, state, card, **extra)
        staging = path.rstrip("/") + ".tmp"
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        fs.put(scratch + "/", staging, recursive=True)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.mv(staging, path, recursive=True)
    return out_dir


def export_card(network: str, network_kwargs: dict[str, Any], key_groups: dict[str, list[str]],
                initialized: list[str], facts: dict[str, Any]) -> dict[str, Any]:
    """The model card: `facts` (method, steps, config, data, ...) plus the network part, which wins."""
    return {**facts, "network": network, "network_kwargs": dict(network_kwargs),
            "key_groups": {**key_groups, "initialized": initialized}, "strict_load": True}


def export_run(run_dir: str, fmt: ExportFormat = "monai", in_channels: int | None = None, out: str | None = None,
               source: str = "auto", out_channels: int | None = None) -> str:
    """`rayssl export RUN`: the run's backbone (export/ or its latest checkpoint) in `fmt`, optionally
    adapted to `in_channels` input channels and given a task head of `out_channels` outputs (freshly
    initialised; see rayssl.pretrained). Default folder: RUN/export (monai), RUN/export_bundle, ..."""
    from rayssl.eval.features import load_run_weights

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if in_channels is not None and in_channels < 1:
        raise ValueError(f"--in-channels {in_channels}: must be >= 1")
    if out_channels is not None and out_channels < 1:
        raise ValueError(f"--out-channels {out_channels}: must be >= 1")
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist: give a run folder (runs/<name>) or an export folder")
    weights = load_run_weights(run_dir, source=source)
    state, initialized = complete_state(weights.network, weights.network_kwargs, weights.state_dict)
    # An export written by rayssl already holds every key; its card says which were initialised.
    initialized = sorted(set(initialized) | set(weights.key_groups.get("initialized", [])))
    kwargs = dict(weights.network_kwargs)
    card = {**weights.card}
    card.pop("load_with", None)
    card.update(export_card(weights.network, kwargs, {k: v for k, v in weights.key_groups.items() if k != "initialized"},
                            initialized, {"method": weights.method, "steps": weights.step}))
    card["num_keys"] = len(state)
    card["num_pretrained_keys"] = sum(not k.startswith(tuple(initialized)) for k in state)
    if in_channels is not None:
        kwargs, state, adapted = adapt_in_channels(weights.network, kwargs, state, in_channels)
        card["network_kwargs"] = kwargs
        card["in_channels_adapted"] = {"in_channels": in_channels, "from": 1, "keys": adapted,
                                       "rule": "1-channel weights repeated along the input axis, scaled by 1/N"}
    if out_channels is not None:
        state, initialized = _with_out_channels(card, state, initialized, out_channels)
        card["num_keys"] = len(state)
    suffix = {"monai": "", "bundle": "_bundle", "safetensors": "_safetensors"}[fmt]
    suffix += f"_{in_channels}ch" if in_channels is not None and in_channels != 1 else ""
    suffix += f"_{out_channels}out" if out_channels is not None else ""
    target = out or posixpath.join(run_dir, "export" + suffix)  # the default monai target rewrites export/ in place
    write_export(target, state, card, fmt)
    print(f"[rayssl] {fmt} export of {weights.method} ({weights.source}, step {weights.step}): {len(state)} tensors, "
          f"{len(initialized)} initialised key group(s), network {card['network']} -> {target}")
    return target


def _with_out_channels(card: dict[str, Any], state: dict[str, torch.Tensor], initialized: list[str],
                       out_channels: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`--out-channels N`: the card's network with a task head of N outputs (load_pretrained's rule);
    updates `card` in place and returns (state, initialised prefixes) of the new network."""
    pretrained = {k: v for k, v in state.items() if not k.startswith(tuple(initialized))}
    groups = {k: v for k, v in card["key_groups"].items() if k != "initialized"}
    net, report = build_pretrained(_Export(source="", network=card["network"], network_kwargs=card["network_kwargs"],
                                           state=pretrained, key_groups=groups, method=card.get("method"),
                                           step=card.get("steps")), out_channels=out_channels)
    if report.prefix:  # the encoder now sits under a wrapper: its key groups move with it
        groups = {k: [report.prefix + p for p in v] for k, v in groups.items()}
    fresh = sorted(set(report.initialized) | set(report.reinitialized))
    card.update(network=report.network, network_kwargs=report.network_kwargs,
                key_groups={**groups, "initialized": fresh},
                out_channels_adapted={"out_channels": int(out_channels), "keys": fresh,
                                      "rule": "task head of N outputs at a seeded fresh initialisation"})
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}, fresh
