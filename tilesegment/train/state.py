"""The training state on disk: ``RUN_DIR/state.safetensors`` + ``state.json`` (optimizer
tensors flattened into safetensors, everything else in JSON; no pickle), the checks a resume
makes, and the run folder's files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tilesegment.errors import ConfigError
from tilesegment.model.checkpoint import checkpoint_paths, file_sha256
from tilesegment.train.config import FROZEN_ON_RESUME, TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "tilesegment-train-state"


STATE_VERSION = 1


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON.

    Tensors of ``sd["state"][p][name]`` become ``optim/<p>/<name>``; in the JSON their place
    holds ``{"tensor": key}``. ``param_groups`` must be JSON-serialisable (true for torch's
    optimizers: numbers, bools, None, tuples of floats, parameter indices).
    """
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        doc: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                key = f"optim/{pid}/{name}"
                tensors[key] = value.detach().to("cpu").contiguous()
                doc[name] = {"tensor": key}
            else:
                doc[name] = value
        state[str(pid)] = doc
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], doc: dict, template: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; ``template`` is a fresh optimizer's
    ``state_dict`` whose tuple-valued hyper-parameters (e.g. Adam's ``betas``) are restored
    as tuples."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in doc["state"].items():
        state[int(pid)] = {
            name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for name, v in entry.items()
        }
    groups = []
    for saved, fresh in zip(doc["param_groups"], template["param_groups"], strict=True):
        group = dict(saved)
        for key, value in fresh.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _atomic_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def save_state(run_dir: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    weights = run_dir / "state.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    tmp.replace(weights)
    doc["state_sha256"] = file_sha256(weights)
    _atomic_json(run_dir / "state.json", doc)


def load_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = run_dir / "state.json"
    if not path.is_file():
        raise ConfigError(
            f"--resume: {path} not found; {run_dir} holds no resumable run (start it without "
            "--resume)"
        )
    try:
        doc = json.loads(path.read_text())
        tensors = load_file(str(run_dir / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"--resume: unreadable training state in {run_dir} ({exc})") from exc
    if doc.get("format") != STATE_FORMAT or int(doc.get("format_version", 0)) > STATE_VERSION:
        raise ConfigError(f"--resume: {path} is not a tilesegment training state")
    if doc.get("state_sha256") != file_sha256(run_dir / "state.safetensors"):
        raise ConfigError(f"--resume: {run_dir}/state.safetensors does not match state.json")
    weights, _ = checkpoint_paths(run_dir / "last")
    if not weights.is_file() or doc.get("weights_sha256") != file_sha256(weights):
        raise ConfigError(
            f"--resume: {weights} does not match {path} (interrupted while saving?); the "
            "run cannot be resumed exactly"
        )
    return tensors, doc


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    current = cfg.to_json()
    for key in FROZEN_ON_RESUME:
        if key not in saved:  # an option newer than the interrupted run
            log.warning("--resume: the interrupted run predates --%s; using %r from here on",
                        key.replace("_", "-"), current.get(key))  # fmt: skip
    changed = [k for k in FROZEN_ON_RESUME if k in saved and current.get(k) != saved[k]]
    if changed:
        detail = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed
        )
        raise ConfigError(f"--resume: options differ from the interrupted run ({detail})")
    for key in ("epochs", "lr", "lr_schedule"):
        if current.get(key) != saved.get(key):
            log.warning(
                "--resume with a different --%s (%r, was %r): the curve will differ from an "
                "uninterrupted run from here on",
                key.replace("_", "-"),
                current.get(key),
                saved.get(key),
            )


RUN_FILES = (
    "last.json",
    "last.safetensors",
    "best.json",
    "best.safetensors",
    "state.json",
    "state.safetensors",
    "log.jsonl",
    "log.csv",
    "curves.png",
)


def check_run_dir(cfg: TrainConfig) -> None:
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"-o {run_dir} exists and is not a folder")
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if cfg.resume or not existing or cfg.overwrite:
        return
    raise ConfigError(
        f"{run_dir} already holds a training run ({existing[0]}); pass --resume to continue "
        "it or --overwrite to start over"
    )
