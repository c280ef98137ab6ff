"""Loading a trained teacher: a vitkd checkpoint, or a user's state dict with its timm arch name."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from vitkd.errors import VitkdInputError
from vitkd.models import create_model


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise VitkdInputError(
            f"teacher checkpoint {path} is a folder: pass the checkpoint file in it, "
            f"e.g. {path / 'checkpoints' / 'best.ckpt'}"
        )
    if not path.is_file():
        raise VitkdInputError(
            f"teacher checkpoint {path} does not exist: train one "
            "(python -m vitkd.fit --config experiments/digits/teacher.yaml) or pass --model.teacher_ckpt PATH"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or not a torch file
        raise VitkdInputError(
            f"teacher checkpoint {path} cannot be read ({type(err).__name__}): "
            "pass a Lightning .ckpt or a torch state dict"
        ) from err


def shape_mismatch(model: nn.Module, state: dict) -> str | None:
    """The first tensor of ``state`` whose shape differs from ``model``'s, as ``"key: (ckpt shape) in the
    checkpoint, (model shape) here"``; None when all shared keys fit (a one-line reason instead of
    ``load_state_dict``'s list of every mismatch)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and hasattr(value, "shape") and tuple(own[key].shape) != tuple(value.shape):
            return f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} here"
    return None


def load_teacher(path: str | Path, arch: str | None = None, **model_kwargs) -> tuple[nn.Module, dict]:
    """Returns (frozen teacher in eval mode, info) where info holds ``arch`` and ``val_acc`` if known.

    A vitkd checkpoint names its arch in its hyper-parameters; a plain state dict needs ``arch``
    (and the model kwargs it was built with).
    """
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" in ckpt:
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        state = ckpt
    arch = hp.get("arch", arch)
    if arch is None:
        raise VitkdInputError(f"teacher checkpoint {path} does not name its arch: pass --model.teacher_arch NAME")
    kwargs = {k: hp[k] for k in ("img_size", "in_chans", "num_classes") if k in hp}
    kwargs.update(hp.get("model_kwargs") or {})
    kwargs.update(model_kwargs)
    model = create_model(arch, **kwargs)
    mismatch = shape_mismatch(model, state)
    if mismatch:
        raise VitkdInputError(
            f"teacher checkpoint {path} does not fit arch {arch!r} ({mismatch}): "
            "pass the arch (--model.init_args.teacher_arch) and sizes it was trained with"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VitkdInputError(
            f"teacher checkpoint {path} does not fit arch {arch!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys): pass the arch it was trained with"
        )
    model.eval().requires_grad_(False)
    return model, {"arch": arch, "val_acc": _best_score(ckpt), **kwargs}


def _best_score(ckpt: dict) -> float | None:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None
