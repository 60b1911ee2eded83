"""Typed run configuration: defaults, method profiles, YAML files and `--set` overrides, validated once."""

from __future__ import annotations

import copy
import math
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rayssl.methods import MethodConfig, get_method_class


def _is_number_field(model: type[BaseModel], name: str | None) -> bool:
    """True for an int/float field of `model` (optional or not) that takes no bool."""
    field = model.model_fields.get(name or "")
    if field is None:
        return False
    args = set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)}
    return bool(args) and args <= {int, float}


class _Strict(BaseModel):
    # inf/nan are never a valid setting (an infinite weight or lr turns sample counts and steps into nonsense).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0: `--set train.steps=true` is a slip, not 1 step.
        if isinstance(value, bool) and _is_number_field(cls, info.field_name):
            raise ValueError("expected a number, not true/false")
        return value


class StoreEntry(_Strict):
    """One store of a multi-store run and its sampling weight (share of samples, normalised over stores)."""

    uri: str = Field(description="Zarr store (path or fsspec URI)")
    weight: float | None = Field(None, gt=0, description="sampling weight (share of samples, normalised over the "
                                 "stores; unset = 1 when another store sets one); no weights = proportional to volumes")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value


class DataSection(_Strict):
    """Where samples come from and how the CPU actor pool builds them."""

    store: str | None = Field(None, description="Zarr store (path or fsspec URI); None = the embedded demo phantoms")
    split: str = Field("train", description="manifest split to train on ('all' = every volume)")
    samples_per_volume: int = Field(1, ge=1, description="samples drawn from each volume per epoch")
    actors_min: int = Field(1, ge=1, description="minimum size of the view-building actor pool")
    actors_max: int = Field(2, ge=1, description="maximum size (the autoscaler may grow the pool up to it)")
    actor_cpus: float = Field(0.5, gt=0, description="logical CPUs reserved per data actor")
    on_error: Literal["raise", "skip"] = Field("raise", description="unreadable volume: stop, or skip it and report")
    prefetch_batches: int = Field(2, ge=0, description="batches prefetched ahead of the training step")
    demo_volumes: int = Field(8, ge=2, description="number of phantoms in the demo store")
    stores: list[StoreEntry] = Field(default_factory=list, description="several stores in one run, e.g. "
                                     "[{uri: a.zarr, weight: 2}, {uri: s3://b/c.zarr, weight: 1}]; `store` is the one-store shorthand")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of object-store "
                                            "stores, e.g. {endpoint_url: ..., key: ..., secret: ...}; default: the "
                                            "standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")

    @model_validator(mode="after")
    def _pool(self) -> "DataSection":
        if self.actors_max < self.actors_min:
            raise ValueError(f"actors_max ({self.actors_max}) must be >= actors_min ({self.actors_min})")
        if self.store and self.stores:
            raise ValueError("give data.store (one store) or data.stores (several), not both")
        return self

    def store_entries(self) -> list[StoreEntry]:
        """The run's stores with their weights (empty = the demo store)."""
        return list(self.stores) if self.stores else ([StoreEntry(uri=self.store)] if self.store else [])


class TrainSection(_Strict):
    """Optimisation, checkpoints and scaling of the Ray Train run."""

    steps: int = Field(40, ge=1, description="optimizer steps")
    epochs: float | None = Field(None, gt=0, description="if set, steps = ceil(epochs x samples per epoch / effective "
                                 "batch), fixed when the run starts (papers that count epochs); an explicit train.steps wins")
    batch_size: int = Field(2, ge=1, description="samples per worker per step")
    # The optimizer recipe: each method's profiles set it (the method owns its recipe); `rayssl
    # recipe --method M --profile P` prints it. rayssl/train/optim.py builds it.
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="weight decay (decoupled for adamw, L2 for adam and sgd)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    nesterov: bool = Field(False, description="sgd Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw betas")
    amsgrad: bool = Field(False, description="adam/adamw AMSGrad variant")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after the warm-up: cosine decay over `steps`, or constant")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up optimizer steps")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine: LR at the last step, as a fraction of lr")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step (gradient accumulation)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (None = off)")
    amp: bool = Field(True, description="bfloat16/float16 autocast on GPU (ignored on CPU)")
    sync_batchnorm: bool = Field(False, description="convert BatchNorm to SyncBatchNorm across the DDP workers, so "
                                 "batch statistics cover the whole effective batch (GPU workers only; several workers)")
    report_every: int = Field(1, ge=1, description="report metrics every k steps")
    checkpoint_every: int = Field(20, ge=1, description="checkpoint every N steps (and at the end)")
    heldout_samples: int = Field(4, ge=0, description="samples (other crops of the training volumes, never trained "
                                 "on) on which the objective is evaluated during the run; 0 = off")
    heldout_every: int | None = Field(None, ge=1, description="evaluate the held-out objective every N steps "
                                      "(None = about ten points per run: steps // 10)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool | None = Field(None, description="None = use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (None = cores / workers)")
    max_failures: int | None = Field(None, ge=-1, description="worker-group restarts from the last checkpoint "
                                     "(-1 = unlimited; None = 1 on a local runtime, 3 when attached to a cluster)")
    controller_failure_limit: int = Field(3, ge=0, description="bounded retries when a worker group cannot be placed")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="non-finite loss: stop keeping the last good checkpoint, or skip the step")
    stop_after: int | None = Field(None, ge=1, description="stop after this step (the schedule still targets `steps`); for tests and budgets")
    storage_path: str | None = Field(None, description="Ray Train storage (shared FS or s3://); default = the run's parent folder")


class EvalSection(_Strict):
    """Linear probes during pretraining (`rayssl pretrain --probe`), scored beside the training step."""

    probe_store: str | None = Field(None, description="labelled Zarr store or named probe set (demo, mni152) to probe "
                                    "during pretraining; None = no online probe")
    probe_every: int | None = Field(None, ge=1, description="probe every N steps, a multiple of train.checkpoint_every "
                                    "(the last step is always probed); None = at every checkpoint")
    probe_cpus: float = Field(1.0, gt=0, description="logical CPUs the probe task reserves (its torch threads)")
    probe_crops: int = Field(8, ge=1, description="probe crops per volume (fit and eval), as Tune's probe")


class RunConfig(_Strict):
    """A whole pretraining run: method + its config, data, training, seed, where it goes."""

    method: str = "voco"
    profile: Literal["cpu", "paper", "official"] = "cpu"
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    method_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _probe_on_checkpoints(self) -> "RunConfig":
        every = self.eval.probe_every
        if every is not None and every % self.train.checkpoint_every:
            raise ValueError(f"eval.probe_every={every} must be a multiple of train.checkpoint_every="
                             f"{self.train.checkpoint_every}: the online probe scores checkpoints")
        return self

    def method_cfg(self) -> MethodConfig:
        return get_method_class(self.method).config_cls.model_validate(self.method_config)

    def with_method_cfg(self, method_cfg: MethodConfig) -> "RunConfig":
        """This config with the fields of `method_cfg` that differ from `method_cfg()` written in
        (e.g. an atlas that `Method.prepare` chose), so the run folder records what was used."""
        current = self.method_cfg().model_dump(mode="json")
        changed = {k: v for k, v in method_cfg.model_dump(mode="json").items() if current.get(k) != v}
        if not changed:
            return self
        return self.model_copy(update={"method_config": {**self.method_config, **changed}})

    def to_yaml_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d[self.method] = d.pop("method_config")
        # Derived, for readers of config.yaml; resolve_config drops it when the file is read back.
        d["train"]["effective_batch"] = self.train.batch_size * self.train.num_workers * self.train.accumulate
        return d


def default_profile() -> str:
    """`paper` when a GPU is visible, else the small `cpu` profile."""
    try:
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def _is_text_field(model: type[BaseModel], name: str) -> bool:
    """True for a `str` or `str | None` field of `model` (not Literal choices, not other types)."""
    field = model.model_fields.get(name)
    if field is None:
        return False
    args = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
    return args == [str]


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def _route(key: str, method: str, method_fields: set[str]) -> list[str]:
    """Where `--set key=...` goes: explicit sections, top-level fields, else a unique field name."""
    parts = key.split(".")
    head = parts[0]
    if head in ("data", "train", "eval"):
        return parts
    if head in (method, "method_config"):
        return ["method_config", *parts[1:]]
    if len(parts) == 1 and head in RunConfig.model_fields and head not in ("data", "train", "eval", "method_config"):
        return parts
    if len(parts) == 1:
        homes = [s for s, fields in (("method_config", method_fields),
                                     ("data", set(DataSection.model_fields)),
                                     ("train", set(TrainSection.model_fields)),
                                     ("eval", set(EvalSection.model_fields))) if head in fields]
        if len(homes) == 1:
            return [homes[0], head]
        if len(homes) > 1:
            raise ValueError(f"--set {key}: ambiguous, it names a field of {homes}; write e.g. {homes[0].replace('method_config', method)}.{key}")
    raise ValueError(
        f"--set {key}: unknown field. Method {method!r} fields: {sorted(method_fields)}; "
        f"data.*: {sorted(DataSection.model_fields)}; train.*: {sorted(TrainSection.model_fields)}; "
        f"eval.*: {sorted(EvalSection.model_fields)}"
    )


def resolve_config(
    method: str | None = None,
    profile: str | None = None,
    file: str | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build and validate a RunConfig: defaults < method profile < YAML file < `--set` overrides.

    Raises ValueError with the offending field named when anything is invalid; no Ray is touched.
    """
    raw: dict[str, Any] = copy.deepcopy(base) if base else {}
    if file:
        raw.update(load_config_file(file))
    method = method or raw.get("method") or "voco"
    method_cls = get_method_class(method)
    if file and method in raw:
        raw[method] = _section(raw[method], method, file)
    if method in raw:  # YAML writes the method section under the method's name
        raw["method_config"] = raw.pop(method)
    _upgrade_legacy(raw)
    profile = profile or raw.get("profile") or default_profile()
    if profile not in method_cls.profiles:
        why = method_cls.missing_profiles.get(profile)
        if why:
            raise ValueError(f"{method} has no {profile!r} profile: {why}; choose one of {sorted(method_cls.profiles)}")
        raise ValueError(f"unknown profile {profile!r} for {method}; choose one of {sorted(method_cls.profiles)}")
    # The profile is applied first; explicit values from the file override it.
    merged: dict[str, Any] = {"method": method, "profile": profile, "data": {}, "train": {}, "eval": {},
                              "method_config": {}}
    for key, value in method_cls.profiles[profile].items():
        if key in ("data", "train"):
            merged[key].update(value)
        else:
            merged["method_config"][key] = value
    for key, value in raw.items():
        if key in ("data", "train", "eval", "method_config") and isinstance(value, dict):
            merged[key].update(value)
        elif key not in ("method", "profile"):
            merged[key] = value
    if "steps" in (raw.get("train") or {}) or any(o.split("=", 1)[0].strip() in ("train.steps", "steps") for o in overrides or []):
        merged["train"]["epochs"] = None  # an explicit step count replaces the profile's epochs
    fields = set(method_cls.config_cls.model_fields)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected field=value")
        key, value = item.split("=", 1)
        path = _route(key.strip(), method, fields)
        # Text fields take the text as written: YAML would read a run name such as 20942_00000
        # (a Tune trial id) as the integer 2094200000.
        section = {"data": DataSection, "train": TrainSection, "eval": EvalSection,
                   "method_config": method_cls.config_cls}.get(path[0], RunConfig)
        text_field = _is_text_field(section, path[-1]) if len(path) <= 2 else False
        _set_path(merged, path, value.strip() if text_field else _parse_value(value.strip()))
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ValueError(_explain(err, "")) from None
    bools = [f"  {method}.{k}: expected a number, not true/false (got {v!r})"
             for k, v in cfg.method_config.items() if isinstance(v, bool) and _is_number_field(method_cls.config_cls, k)]
    # Method configs are the methods' own models: inf/nan is refused here, as written and as parsed ('inf' text).
    infinite = [f"  {method}.{k}: must be a finite number (got {v!r})" for k, v in _non_finite(cfg.method_config)]
    if bools or infinite:
        raise ValueError("\n".join(["invalid configuration:", *bools, *infinite]))
    try:
        method_cfg = cfg.method_cfg()
    except ValidationError as err:
        raise ValueError(_explain(err, method + ".", method_cls.config_cls)) from None
    infinite = [f"  {method}.{k}: must be a finite number (got {v!r})"
                for k, v in _non_finite(method_cfg.model_dump(mode="python"))]
    if infinite:
        raise ValueError("\n".join(["invalid configuration:", *infinite]))
    # Store every method field explicitly, so config.yaml shows the whole resolved method config.
    return cfg.model_copy(update={"method_config": method_cfg.model_dump(mode="json")})


def _non_finite(value: Any, path: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every inf/nan float inside `value` (dicts, lists, tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _non_finite(v, f"{path}[{i}]")]
    return []


_CONFIG_HELP = ("a rayssl config is a YAML mapping such as `method: voco`, `train:` with `steps: 40` "
                "indented under it; a run folder's config.yaml is a complete example")


def _line_of(file: str, key: str) -> int | None:
    """1-based line of top-level `key` in the YAML `file` (None when it cannot be found)."""
    try:
        with open(file) as f:
            node = yaml.compose(f)
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if getattr(key_node, "value", None) == key:
                return key_node.start_mark.line + 1
    return None


def _section(value: Any, key: str, file: str) -> dict[str, Any]:
    """A config file's section `key` as a dict (empty when left blank); a scalar or list is refused, naming the line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        line = _line_of(file, key)
        where = f"{file}, line {line}" if line else file
        raise ValueError(f"{where}: section {key!r} must be a mapping of field: value lines, got "
                         f"{type(value).__name__} {value!r}; {_CONFIG_HELP}")
    return value


def load_config_file(file: str) -> dict[str, Any]:
    """A YAML config file as a dict; malformed YAML or a section that is not a mapping is a ValueError
    naming the file and line (not yaml's traceback)."""
    try:
        with open(file) as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else file
        problem = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p) or str(err)
        raise ValueError(f"{where}: not valid YAML ({problem}); fix that line (check its indentation and the "
                         f"`key: value` form; quote values holding ':' or '#'): {_CONFIG_HELP}") from None
    except IsADirectoryError:
        raise ValueError(f"--config {file}: is a folder; give its config.yaml") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{file}: a config file must be a YAML mapping, got {type(loaded).__name__} "
                         f"{str(loaded)[:80]!r}; {_CONFIG_HELP}")
    for key in ("data", "train", "eval", "method_config"):
        if key in loaded:
            loaded[key] = _section(loaded[key], key, file)
    return loaded


def _upgrade_legacy(raw: dict[str, Any]) -> None:
    """Read config.yaml files of older runs: the optimizer recipe moved from the method section to
    `train` (lr, weight_decay, warmup_steps), and `train.effective_batch` is derived, not an input."""
    method_section = raw.get("method_config") or {}
    train = raw.setdefault("train", {}) if ("train" in raw or any(
        k in method_section for k in ("lr", "weight_decay", "warmup_steps"))) else None
    if train is None:
        return
    for key in ("lr", "weight_decay", "warmup_steps"):
        if key in method_section:
            value = method_section.pop(key)
            if train.get(key) is None:
                train[key] = value
    for key in ("lr", "weight_decay", "warmup_steps"):
        if key in train and train[key] is None:
            del train[key]
    train.pop("effective_batch", None)


def _explain(err: ValidationError, prefix: str, model: type[BaseModel] = RunConfig) -> str:
    lines = ["invalid configuration:"]
    for e in err.errors():
        if not e["loc"]:  # a check across fields: its message names them
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        loc = prefix + ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":  # a typo: say so and list the fields that exist there
            lines.append(f"  {loc.rstrip('.')}: unknown field (got {e.get('input')!r}); valid fields here: "
                         f"{sorted(_section_fields(model, e['loc'][:-1]))}")
        else:
            lines.append(f"  {loc.rstrip('.')}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return "\n".join(lines)


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model section at `loc`, [] when it cannot be followed."""
    for part in loc:
        field = model.model_fields.get(str(part))
        inner = getattr(field, "annotation", None) if field else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return list(model.model_fields)
