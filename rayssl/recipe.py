"""The resolved training recipe of a method and profile as text rows: what `rayssl recipe` prints."""

from __future__ import annotations

from rayssl.config import RunConfig, TrainSection
from rayssl.methods import get_method_class


def optimizer_text(tc: TrainSection) -> str:
    """E.g. "SGD, momentum 0.9" or "AdamW, betas (0.9, 0.999), amsgrad"."""
    if tc.optimizer == "sgd":
        return f"SGD, momentum {tc.momentum:g}" + (", Nesterov" if tc.nesterov else "")
    name = {"adamw": "AdamW", "adam": "Adam"}[tc.optimizer]
    return f"{name}, betas ({tc.betas[0]:g}, {tc.betas[1]:g})" + (", amsgrad" if tc.amsgrad else "")


def schedule_text(tc: TrainSection) -> str:
    """E.g. "cosine to 0 after 100 warm-up steps" or "constant, no warm-up"."""
    body = "constant" if tc.schedule == "constant" else f"cosine to {tc.final_lr_fraction:g} x lr"
    return body + (f" after {tc.warmup_steps} warm-up steps" if tc.warmup_steps else ", no warm-up")


def train_rows(tc: TrainSection) -> dict[str, str]:
    """The optimizer, schedule, batch and precision rows of a recipe."""
    effective = tc.batch_size * tc.num_workers * tc.accumulate
    return {
        "optimizer": optimizer_text(tc),
        "lr": f"{tc.lr:g}",
        "weight decay": f"{tc.weight_decay:g}",
        "schedule": schedule_text(tc),
        "batch per worker": str(tc.batch_size),
        "effective batch": str(effective),  # batch per worker x workers x accumulated micro-batches
        "length": f"{tc.epochs:g} epochs" if tc.epochs is not None else f"{tc.steps} steps",
        "mixed precision": "on (GPU only)" if tc.amp else "off (fp32)",
        "gradient clipping": f"norm {tc.grad_clip:g}" if tc.grad_clip is not None else "off",
    }


def recipe_rows(cfg: RunConfig) -> dict[str, str]:
    """Setting -> value of a resolved run config: the loop's rows, then the method's own."""
    method = get_method_class(cfg.method)(cfg.method_cfg())
    return {**train_rows(cfg.train), **method.recipe()}


def format_recipe(cfg: RunConfig) -> str:
    """The recipe as an aligned two-column text table, headed by method and profile."""
    rows = recipe_rows(cfg)
    width = max(len(k) for k in rows)
    lines = [f"{cfg.method} recipe, profile {cfg.profile!r}:"]
    lines += [f"  {key.ljust(width)}  {value}" for key, value in rows.items()]
    return "\n".join(lines)
