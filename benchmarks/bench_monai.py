"""tilesegment vs MONAI ``sliding_window_inference`` on the same image, same network size.

    pip install -e ".[bench]"      # MONAI lives only in the benchmark extra
    python benchmarks/bench_monai.py --repeats 3

The image is the real H&E slide CMU-1-Small-Region.svs (2967 x 2220 px). Both tools run a
depth-4, base-16 U-Net with the *same weights*: tilesegment the valid-convolution net (tile
572, end to end from the slide file to a finished OME-Zarr with pyramid, and the same tiling
on the image in memory, stitched into an array: MONAI's conditions), MONAI the same net
with padding=1 ("same") convolutions on the image held in memory as a normalised tensor, at
its common settings: roi 256 with overlap 0.25 and gaussian blending, and roi 256 with
overlap 0; and at the context tilesegment gives every output pixel (92 px on each side: roi
256 with overlap 0.75, whose window centres then tile the image and dominate the gaussian
blend). MONAI runs with its defaults (NCHW) and with the model in channels-last. Both in
fp32, or both under bf16 autocast (``--precision bf16``); same process, same torch threads;
medians of ``--repeats`` alternating rounds.

Seam map: for each tool, |tiled - whole-image| / sigma of the class-1 probability, where the
whole-image output is one forward pass of that tool's network over the whole (padded) image
and sigma is the standard deviation of that whole-image probability. Drawn to
``benchmarks/seams.png``; tilesegment's should be black.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "monai"
DATA = Path(os.environ.get("TILESEGMENT_DATA", HERE.parent.parent / "shared" / "data"))


#: MONAI at the context tilesegment gives every output pixel (see ``main``).
EQUAL_CONTEXT = "monai overlap 0.75 gaussian, channels-last (92 px context)"


class SamePaddedUNet(torch.nn.Module):
    """tilesegment's U-Net with every 3x3 convolution zero-padded by 1 (output = input size).

    Shares the valid net's modules (and so its weights); only the padding differs. Inputs
    must be multiples of the pooling factor.
    """

    def __init__(self, valid) -> None:
        import copy

        super().__init__()
        self.net = copy.deepcopy(valid)
        for m in self.net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.padding = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        skips = []
        for block in net.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = net.bottom(x)
        for up, conv, skip in zip(net.ups, net.up_convs, reversed(skips), strict=True):
            x = up(x)
            x = conv(torch.cat([skip, x], dim=1))
        return net.head(x)


def normalise(image: np.ndarray, spec) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def whole_same(model, x: torch.Tensor, pooling: int) -> np.ndarray:
    """One forward pass over the whole image, zero-padded bottom/right to the pooling grid."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % pooling, (-w) % pooling
    logits = model(F.pad(x, (0, pw, 0, ph)))[..., :h, :w]
    return torch.softmax(logits.float(), dim=1)[0].numpy()


def autocast(precision: str):
    """bf16 autocast on the CPU, or nothing for fp32 (the same switch for both tools)."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


@torch.inference_mode()
def monai_tiled(
    model, x: torch.Tensor, overlap: float, mode: str, precision: str
) -> tuple[np.ndarray, float]:
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    with autocast(precision):
        logits = sliding_window_inference(x, (256, 256), 1, model, overlap=overlap, mode=mode)
    probs = torch.softmax(logits.float(), dim=1)[0].numpy()
    return probs, time.perf_counter() - t0


class ArrayReader:
    """The in-memory image as a (level-0 only) slide reader."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.image[y : y + h, x : x + w]


def ours_in_memory(image: np.ndarray, valid, spec, precision: str) -> tuple[np.ndarray, float]:
    """tilesegment's tiling on the image in memory, stitched into an array: the same work as
    MONAI's call (no file decoding, no Zarr, no pyramid)."""
    from tilesegment.infer.plan import plan_grid
    from tilesegment.infer.predict import make_predictor
    from tilesegment.infer.stream import read_tile

    predictor = make_predictor(copy.deepcopy(valid), spec, "cpu", precision)
    grid = plan_grid(image.shape[:2], valid, 572)
    reader = ArrayReader(image)
    out = np.empty((spec.unet.classes, *image.shape[:2]), dtype=np.float32)
    t0 = time.perf_counter()
    for tile in grid:
        probs = predictor(read_tile(reader, 0, tile, grid.image_shape, 3)[None])[0]
        w, c = tile.write, tile.core
        out[:, w.y : w.y + w.h, w.x : w.x + w.w] = probs[:, c.y : c.y + c.h, c.x : c.x + c.w]
    return out, time.perf_counter() - t0


def ours(slide: Path, model: Path, out: Path, dtype: str, precision: str) -> tuple[Path, float]:
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide

    opts = RunOptions(
        tile_size=572,
        tissue="none",
        preview=False,
        progress=False,
        overwrite=True,
        dtype=dtype,
        precision=precision,
    )
    t0 = time.perf_counter()
    run_slide(slide, out, model, opts)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--png", type=Path, default=HERE / "seams.png")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="both tools alike"
    )
    args = ap.parse_args()

    from tilesegment.infer.predict import Predictor, predict_image
    from tilesegment.io import open_slide
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint
    from tilesegment.store import OutputStore

    WORK.mkdir(parents=True, exist_ok=True)
    slide = DATA / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(slide) as reader:
        h, w = reader.info.shape
        image = reader.read_region(0, 0, 0, h, w)
    mpx = h * w / 1e6
    spec = ModelSpec.default(UNetConfig(base_channels=args.base_channels), name="unet-monai")
    valid = new_model(spec, seed=0)
    model_path = WORK / "unet-monai"
    save_checkpoint(valid, spec, model_path)
    same = SamePaddedUNet(valid).eval()
    same_cl = SamePaddedUNet(valid).eval().to(memory_format=torch.channels_last)
    x = normalise(image, spec)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    configs = {
        "monai overlap 0.25 gaussian": (same, x, 0.25, "gaussian"),
        "monai overlap 0.25 gaussian, channels-last": (same_cl, x_cl, 0.25, "gaussian"),
        "monai overlap 0": (same, x, 0.0, "constant"),
        "monai overlap 0, channels-last": (same_cl, x_cl, 0.0, "constant"),
        # Equal context: the central 256 - 2 * 92 = 72 px of a window see the valid net's full
        # 92 px halo, and a stride of 64 px (overlap 0.75; <= 72 and on the 16 px pooling
        # grid, unlike 0.72's 71 px) puts every pixel in some window's centre; the gaussian
        # (sigma 32 px) gives those windows most of the weight.
        EQUAL_CONTEXT: (same_cl, x_cl, 0.75, "gaussian"),
    }
    e2e, in_memory = "tilesegment (end to end)", "tilesegment (in memory, like MONAI)"
    seconds: dict[str, list[float]] = {e2e: [], in_memory: [], **{k: [] for k in configs}}
    tiled: dict[str, np.ndarray] = {}
    out = WORK / "monai-ours.zarr"
    prec = args.precision
    ours(slide, model_path, out, "uint8", prec)  # warm-up (file cache, oneDNN kernels)
    for r in range(args.repeats):
        seconds[e2e].append(ours(slide, model_path, out, "uint8", prec)[1])
        seconds[in_memory].append(ours_in_memory(image, valid, spec, prec)[1])
        for name, (model, inp, overlap, mode) in configs.items():
            probs, s = monai_tiled(model, inp, overlap, mode, prec)
            seconds[name].append(s)
            if r == 0 and ("channels-last" not in name or name == EQUAL_CONTEXT):
                tiled[name] = probs[1]
        print(json.dumps({k: round(v[-1], 2) for k, v in seconds.items()}), file=sys.stderr)

    # Seam maps: each tool against one whole-image pass of its own network.
    ours_f32, _ = ours(slide, model_path, WORK / "monai-ours-f32.zarr", "float32", prec)
    ours_tiled = OutputStore.open(ours_f32).probabilities[1]
    ours_whole = predict_image(image, Predictor(copy.deepcopy(valid), spec, precision=prec))[1]
    with autocast(prec):
        same_whole = whole_same(same, x, 2**spec.unet.depth)[1]
    maps = {
        "tilesegment (valid U-Net, tile 572)": np.abs(ours_tiled - ours_whole) / ours_whole.std()
    }
    for name, probs in tiled.items():
        maps[name.replace("monai", "MONAI")] = np.abs(probs - same_whole) / same_whole.std()

    rates = {k: mpx / statistics.median(v) for k, v in seconds.items()}
    monai = {k: v for k, v in rates.items() if k.startswith("monai")}
    result = {
        "benchmark": "monai",
        "machine": (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.1f} at the end"
        ),
        "image": f"{slide.name} {h} x {w} px",
        "model": f"depth 4, base {args.base_channels}, {prec}, same weights",
        "mpx_per_s_median": {k: round(v, 3) for k, v in rates.items()},
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "ratios": {
            f"{ours_name} / {k}": round(rates[ours_name] / v, 2)
            for ours_name in (e2e, in_memory)
            for k, v in monai.items()
        },
        "seam_max_over_sigma": {k: float(f"{v.max():.3g}") for k, v in maps.items()},
        "seam_mean_over_sigma": {k: float(f"{v.mean():.3g}") for k, v in maps.items()},
    }
    draw(maps, args.png)
    result["png"] = str(args.png)
    print(json.dumps(result, indent=2))


def draw(maps: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 5.4), constrained_layout=True)
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=0.5, interpolation="nearest")
        ax.set_title(f"{name}\nmax {m.max():.2g} sigma, mean {m.mean():.2g} sigma", fontsize=9)
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.7, label="|tiled - whole image| / sigma")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
