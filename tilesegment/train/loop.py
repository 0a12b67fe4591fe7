"""The training loop: weighted cross-entropy, DDP, checkpoints and resume, logs and curves.

Loss
    Pixel-wise softmax cross-entropy on the valid output window, weighted by the weight map
    and normalised by the weights of the *global* batch: ``sum(w * CE) / sum(w)`` over every
    pixel of every crop of the step, on all ranks together. Each rank computes its local sum,
    one all-reduce gives the global ``sum(w)`` (and the global loss, for logging and the NaN
    check, so every rank stops together), and rank ``r`` back-propagates
    ``R * sum_r(w * CE) / sum(w)``; DDP's gradient averaging (divide by R) then yields exactly
    the gradient of the single-process loss. A weighted mean, unlike a plain mean, keeps the
    loss scale independent of how much border weight a batch happens to contain.
Data split
    The global batch of step ``s`` is samples ``s * B .. s * B + B - 1`` of the epoch; rank
    ``r`` of ``R`` takes the block of ``B / R`` starting at ``s * B + r * B / R``
    (:class:`~tilesegment.train.data.RankSampler`). A sample depends only on (seed, epoch,
    index), so 1 and R processes see the same data in the same batches. (With
    ``--batch-norm`` the statistics are per rank, over its B / R crops, and DDP broadcasts
    rank 0's running statistics: the run then depends on R; no SyncBatchNorm.)
Checkpoints
    After every epoch rank 0 writes ``RUN_DIR/last`` (``.safetensors`` + ``.json``, a normal
    model checkpoint), ``RUN_DIR/best`` when the validation metric improved, and the training
    state ``RUN_DIR/state.safetensors`` + ``state.json``: the optimizer ``state_dict`` with
    its tensors flattened into safetensors under ``optim/<param>/<name>`` and everything else
    (hyper-parameters, step counters) in JSON, the GradScaler state, the epoch/step
    counters, the best score and the history; no pickle anywhere. The state
    JSON records the SHA-256 of ``last.safetensors`` so a torn pair is detected on resume.
Determinism
    Crops come from (seed, epoch, index); torch's global RNG (dropout) is re-seeded at every
    epoch from (seed, epoch, rank), so its state is a function of the counters and needs no
    saving; the learning rate is a pure function of the global step; validation runs on a
    copy of the network. A run resumed from epoch k therefore
    continues exactly where an uninterrupted run would be (bit for bit on CPU with the same
    thread count).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from tilesegment.errors import ConfigError
from tilesegment.geometry import UNetGeometry
from tilesegment.model.checkpoint import (
    InstanceSpec,
    ModelSpec,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
    new_model,
    save_checkpoint,
)
from tilesegment.model.unet import UNetConfig
from tilesegment.train.config import (
    Schedule,
    TrainConfig,
    TrainingDiverged,
    TrainSummary,
    check_config,
    provenance_config,
    provenance_path,
)
from tilesegment.train.evaluate import evaluate_items, selection_metric
from tilesegment.train.logs import describe, draw_curves, finite, short, write_logs
from tilesegment.train.sampling import (
    CropDataset,
    CropSampler,
    RankSampler,
    augment_options,
    prepare_run_data,
)
from tilesegment.train.state import (
    RUN_FILES,
    STATE_FORMAT,
    STATE_VERSION,
    check_resume_config,
    check_run_dir,
    flatten_optimizer_state,
    load_state,
    save_state,
    unflatten_optimizer_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Ranks:
    world: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ranks_from_env() -> _Ranks:
    """WORLD_SIZE / RANK / LOCAL_RANK as set by torchrun; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"malformed WORLD_SIZE/RANK/LOCAL_RANK environment ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} / WORLD_SIZE {world} from the environment are invalid")
    return _Ranks(world, rank, local)


def _device_for(cfg: TrainConfig, ranks: _Ranks) -> torch.device:
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {cfg.device!r} is not a torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
        if ranks.world > 1:
            device = torch.device("cuda", ranks.local_rank)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"--precision {cfg.precision} needs a CUDA device; training on {device.type} "
            "runs in fp32"
        )
    return device


def learning_rate(step: int, total: int, peak: float, schedule: Schedule) -> float:
    """Learning rate for (0-based) optimizer step ``step`` of ``total``.

    >>> learning_rate(0, 100, 1.0, "cosine"), round(learning_rate(100, 100, 1.0, "cosine"), 3)
    (1.0, 0.01)
    >>> [learning_rate(s, 100, 1.0, "step") for s in (0, 50, 75)]
    [1.0, 0.1, 0.010000000000000002]
    """
    if schedule == "constant" or total <= 0:
        return peak
    t = min(step / total, 1.0)
    if schedule == "cosine":
        return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))
    if schedule == "step":
        return peak * 0.1 ** (int(t >= 0.5) + int(t >= 0.75))
    raise ConfigError(f"--lr-schedule {schedule!r} must be cosine, step or constant")


class _Trainer:
    """One rank's training state; constructed by :func:`run_training`."""

    def __init__(self, cfg: TrainConfig, ranks: _Ranks, device: torch.device) -> None:
        self.cfg, self.ranks, self.device = cfg, ranks, device
        geometry = UNetGeometry.of(cfg.depth)
        geometry.check_input_size(cfg.tile_size, name="--tile-size")
        self.data = prepare_run_data(cfg, geometry, main=ranks.is_main)
        self.kind = self.data.kind
        self.metric, self.lower_is_better = selection_metric(
            self.kind, cfg.select_metric, validation=bool(self.data.val)
        )
        self.spec = self._make_spec()
        self.net = new_model(self.spec, seed=cfg.seed).to(device).train()
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.net
        if ranks.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        c = self.spec.unet.in_channels
        self._mean = torch.tensor(self.spec.mean, device=device).view(1, c, 1, 1)
        self._inv_std = (1.0 / torch.tensor(self.spec.std, device=device)).view(1, c, 1, 1)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "value": None}
        self.total_steps = cfg.epochs * cfg.steps_per_epoch
        self.train_seconds = 0.0
        self.train_steps_timed = 0
        self.sampler = RankSampler(
            steps=cfg.steps_per_epoch,
            global_batch=cfg.batch_size,
            rank=ranks.rank,
            world=ranks.world,
        )
        self.loader = self._make_loader()

    # ---------------------------------------------------------------- setup
    def _make_spec(self) -> ModelSpec:
        cfg = self.cfg
        unet = UNetConfig(
            depth=cfg.depth,
            base_channels=cfg.base_channels,
            in_channels=self.data.channels,
            classes=len(self.data.class_names),
            batch_norm=cfg.batch_norm,
            dropout=cfg.dropout,
        )
        name = cfg.name or cfg.run_dir.resolve().name
        base = ModelSpec.default(unet, name=name, mpp=cfg.mpp)
        # A boundary class (1 = interior, 2 = boundary) makes seeded instances in `run`.
        seeded = InstanceSpec() if cfg.boundary_class else None
        return dataclasses.replace(
            base,
            class_names=self.data.class_names,
            mean=self.data.mean,
            std=self.data.std,
            instances=seeded,
            downsample=cfg.downsample,
        )

    def _make_loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        crops = CropSampler(
            self.data.train,
            tile=cfg.tile_size,
            halo=self.net.halo,
            pooling=self.net.pooling,
            seed=cfg.seed,
            augment=augment_options(cfg),
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        return torch.utils.data.DataLoader(
            CropDataset(crops),
            batch_size=self.sampler.local_batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            worker_init_fn=_worker_init,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = self.net.parameters()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        raise ConfigError(f"--optimizer {cfg.optimizer!r} must be adam or sgd")

    def resume(self) -> None:
        tensors, doc = load_state(self.cfg.run_dir)
        check_resume_config(self.cfg, doc["config"])
        net, spec = load_checkpoint(self.cfg.run_dir / "last", device=self.device)
        if spec.unet != self.spec.unet:
            raise ConfigError(
                f"--resume: the saved model is {spec.unet}, expected {self.spec.unet}"
            )
        self.net.load_state_dict(net.state_dict())
        self.net.train()
        template = self.optimizer.state_dict()
        self.optimizer.load_state_dict(
            unflatten_optimizer_state(tensors, doc["optimizer"], template)
        )
        if self.scaler is not None and doc.get("scaler"):
            self.scaler.load_state_dict(doc["scaler"])
        self.epoch, self.step = int(doc["epoch"]), int(doc["global_step"])
        self.history = list(doc["history"])
        self.best = dict(doc["best"])
        self.train_seconds = float(doc.get("train_seconds", 0.0))
        self.train_steps_timed = int(doc.get("train_steps_timed", 0))
        if self.ranks.is_main:
            log.info("resumed %s at epoch %d, step %d", self.cfg.run_dir, self.epoch, self.step)
            write_logs(self.cfg.run_dir, self.history, self.kind)

    # ---------------------------------------------------------------- one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self, batch: Sequence[torch.Tensor]) -> float:
        """One optimizer step on this rank's share of a global batch; returns the global loss."""
        image, target, weights = (t.to(self.device, non_blocking=True) for t in batch)
        x = image.float().mul_(1.0 / 255.0)
        x = (x - self._mean) * self._inv_std
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = learning_rate(self.step, self.total_steps, self.cfg.peak_lr, self.cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            logits = self.model(x)
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        local_sum = (weights * ce).sum()
        totals = torch.stack([local_sum.detach(), weights.sum()]).double()
        if self.ranks.world > 1:
            dist.all_reduce(totals)
        global_loss = float(totals[0] / totals[1])
        if not math.isfinite(global_loss):
            self._diverged("loss", global_loss, lr)
        loss = local_sum * (self.ranks.world / totals[1].float())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
            if not torch.isfinite(norm) and self.scaler is None:
                self._diverged("gradient norm", float(norm), lr)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        return global_loss

    def _diverged(self, what: str, value: float, lr: float) -> None:
        last = checkpoint_paths(self.cfg.run_dir / "last")[1]
        keep = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise TrainingDiverged(
            f"training diverged: the {what} is {value} at epoch {self.epoch + 1}, step "
            f"{self.step + 1} (lr {lr:.3g}); lower --lr (e.g. {self.cfg.peak_lr / 10:.2g}) or "
            f"check the labels and weight maps{keep}"
        )

    # ---------------------------------------------------------------- epochs
    def validate(self) -> tuple[float | None, dict[str, Any]]:
        """(validation loss, mean metrics) of the current weights on the validation images."""
        if not self.data.val:
            return None, {}
        from tilesegment.infer.predict import Predictor

        net = copy.deepcopy(self.net).eval()
        precision = self.cfg.precision if self.device.type == "cuda" else "fp32"
        predictor = Predictor(net, self.spec, device=self.device, precision=precision)
        report = evaluate_items(
            self.data.val, predictor, self.kind, min_object_size=self.cfg.min_object_size
        )
        return finite(report.loss), report.mean

    def _improved(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        best = self.best.get("value")
        if best is None:
            return True
        return value < best if self.lower_is_better else value > best

    def _row(self, train_loss: float | None, seconds: float) -> dict[str, Any]:
        val_loss, metrics = self.validate()
        lr = learning_rate(self.step, self.total_steps, self.cfg.peak_lr, self.cfg.lr_schedule)
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": finite(train_loss),
            "val_loss": val_loss,
        }
        row.update({k: finite(v) for k, v in metrics.items()})
        row.update(lr=lr, seconds=round(seconds, 3))
        return row

    def _selection(self) -> dict[str, Any]:
        """How the best checkpoint is chosen, as the provenance records it."""
        return {
            "metric": self.metric,
            "lower_is_better": self.lower_is_better,
            "chosen_by": "--select-metric" if self.cfg.select_metric else "label kind",
            "split": "validation" if self.data.val else "training",
            "images": len(self.data.val or self.data.train),
            "best_epoch": self.best.get("epoch"),
            "best_value": self.best.get("value"),
        }

    def save(self, row: dict[str, Any]) -> None:
        """Checkpoints, state, logs and curves after an epoch (rank 0 only)."""
        cfg = self.cfg
        run_dir = cfg.run_dir
        improved = row["epoch"] > 0 and self._improved(row.get(self.metric))
        if improved:
            self.best = {"epoch": row["epoch"], "value": row[self.metric], "metric": self.metric}
        training = {
            "command": "tilesegment train",
            "label_kind": self.kind,
            "boundary_class": cfg.boundary_class,
            "data": {
                "images": provenance_path(cfg.images),
                "labels": provenance_path(cfg.labels),
                "train": [it.name for it in self.data.train],
                "validation": [it.name for it in self.data.val],
            },
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.ranks.world,
            "config": provenance_config(cfg),
            "selection": self._selection(),
            "metrics": {k: v for k, v in row.items() if k not in ("lr", "seconds")},
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        spec = dataclasses.replace(self.spec, training=training)
        weights, _ = save_checkpoint(self.net, spec, run_dir / "last")
        if improved:
            save_checkpoint(self.net, spec, run_dir / "best")
        tensors, optim_doc = flatten_optimizer_state(self.optimizer.state_dict())
        doc = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "epoch": self.epoch,
            "global_step": self.step,
            "weights_sha256": file_sha256(weights),
            "optimizer": optim_doc,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": self.best,
            "history": self.history,
            "config": cfg.to_json(),
            "train_seconds": self.train_seconds,
            "train_steps_timed": self.train_steps_timed,
        }
        save_state(run_dir, tensors, doc)
        write_logs(run_dir, self.history, self.kind)
        draw_curves(run_dir / "curves.png", self.history, self.kind)

    def run(self, stop_after_epoch: int | None = None) -> TrainSummary:
        cfg, main = self.cfg, self.ranks.is_main
        if main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.history and main and self.data.val:
            start = time.perf_counter()
            row = self._row(None, 0.0)
            row["seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            log.info("epoch 0 (untrained): %s", describe(row, self.kind))
        bar = _progress_bar(cfg, main, self.step, self.total_steps)
        try:
            while self.epoch < cfg.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                self._one_epoch(bar)
        finally:
            if bar is not None:
                bar.close()
        return self._summary()

    def _one_epoch(self, bar: Any) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        self.net.train()
        self.sampler.epoch = self.epoch
        torch.manual_seed(_torch_seed(cfg.seed, self.epoch, self.ranks.rank))
        losses = []
        for batch in self.loader:
            t0 = time.perf_counter()
            losses.append(self.train_step(batch))
            self.train_seconds += time.perf_counter() - t0
            self.train_steps_timed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{losses[-1]:.4f}")
        self.epoch += 1
        if self.ranks.is_main:
            row = self._row(float(np.mean(losses)), 0.0)
            row["seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            self.save(row)
            log.info("epoch %d/%d: %s", self.epoch, cfg.epochs, describe(row, self.kind))
            if bar is not None:
                bar.set_postfix(epoch=self.epoch, **short(row, self.metric))
        if self.ranks.world > 1:
            dist.barrier()

    def _summary(self) -> TrainSummary:
        run_dir = self.cfg.run_dir
        best_epoch = self.best.get("epoch")
        best_path = run_dir / "best" if best_epoch is not None else None
        timed = self.train_steps_timed
        return TrainSummary(
            run_dir=run_dir,
            epochs_run=self.epoch,
            global_step=self.step,
            best_epoch=best_epoch,
            best_metric=self.metric,
            best_value=math.nan if self.best.get("value") is None else self.best["value"],
            best_path=best_path,
            last_path=run_dir / "last",
            history=list(self.history),
            seconds_per_step=self.train_seconds / timed if timed else math.nan,
        )


def _torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's global RNG (dropout) for one epoch of one rank.

    Re-seeding at every epoch from the counters makes the RNG state a function of
    (seed, epoch, rank): nothing to save, and a resumed run draws the same numbers.
    """
    return int(np.random.SeedSequence([seed, epoch, rank, 0x70C4]).generate_state(1)[0])


def _worker_init(worker_id: int) -> None:
    """DataLoader workers: one thread each (they only run numpy augmentation)."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # nothing should use the global RNG; make it reproducible anyway  # noqa: NPY002


def _progress_bar(cfg: TrainConfig, main: bool, done: int, total: int) -> Any:
    if not (cfg.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", desc="train", dynamic_ncols=True)


def run_training(cfg: TrainConfig, *, stop_after_epoch: int | None = None) -> TrainSummary:
    """Train (or resume) a valid U-Net as configured; the entry point of ``tilesegment train``.

    Launched by ``torchrun`` it runs as one rank of a DistributedDataParallel job (gloo on CPU,
    NCCL on CUDA; WORLD_SIZE/RANK/LOCAL_RANK from the environment). Only rank 0 writes files.

    Parameters
    ----------
    cfg : TrainConfig
    stop_after_epoch : int, optional
        Stop (as if interrupted) once this many epochs are complete; the run can be resumed.

    Raises
    ------
    ConfigError
        Bad data, options or run folder.
    TrainingDiverged
        The loss or gradient became NaN/inf.
    """
    check_config(cfg)
    ranks = _ranks_from_env()
    device = _device_for(cfg, ranks)
    check_run_dir(cfg)
    if cfg.batch_size % ranks.world:
        raise ConfigError(
            f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes "
            f"({ranks.world})"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    try:
        if ranks.world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
            started = True
        trainer = _Trainer(cfg, ranks, device)
        if cfg.resume:
            trainer.resume()
        elif cfg.overwrite and ranks.is_main:
            for name in RUN_FILES:
                (cfg.run_dir / name).unlink(missing_ok=True)
        if ranks.world > 1:
            dist.barrier()
        return trainer.run(stop_after_epoch)
    finally:
        if started:
            dist.destroy_process_group()
