"""The shipped models: present, small, loadable without pickle, and accurate on held-out data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import data_path
from tilesegment.infer.predict import Predictor, predict_image
from tilesegment.model import load_checkpoint
from tilesegment.model.registry import DEFAULT_MODEL, resolve_model, shipped_models
from tilesegment.train.evaluate import labels_from_probabilities
from tilesegment.train.metrics import (
    aggregated_jaccard_index,
    rand_scores,
    segmentation_from_binary,
)


def test_the_models_ship_small_with_cards():
    models = {m.name: m for m in shipped_models()}
    assert {"nuclei-he", "membrane-em", "lesion-derm"} <= set(models)
    assert DEFAULT_MODEL == "nuclei-he"
    for m in models.values():
        weights = m.path.with_suffix(".safetensors")
        assert weights.stat().st_size <= 20 * 2**20
        card = m.path.with_suffix(".md").read_text()
        assert "**Terms**" in card and "Held-out metrics" in card and "Cite" in card, m.name
    for name in ("nuclei-he", "membrane-em"):  # MoNuSeg, ISBI 2012
        assert "non-commercial" in models[name].path.with_suffix(".md").read_text()
    assert models["nuclei-he"].mpp == 0.25 and models["nuclei-he"].classes[1] == "nucleus"
    assert models["membrane-em"].classes == ("membrane", "cell")
    assert models["lesion-derm"].classes == ("background", "lesion")


def test_nuclei_he_on_a_held_out_monuseg_tile():
    name = "TCGA-AR-A1AS-01Z-00-DX1"  # in nuclei-he's validation split, never trained on
    image = np.asarray(Image.open(data_path("monuseg", "images", f"{name}.png")).convert("RGB"))
    truth = tifffile.imread(data_path("monuseg", "labels", f"{name}.tif"))
    net, spec = load_checkpoint(resolve_model("nuclei-he"))
    probs = predict_image(image[:512, :512], Predictor(net, spec))
    pred = labels_from_probabilities(probs, "instances", min_object_size=10, seeded=spec.instances)
    aji = aggregated_jaccard_index(pred, truth[:512, :512])
    assert aji >= 0.4, aji


def test_membrane_em_on_a_held_out_isbi_slice():
    volume = tifffile.imread(data_path("isbi2012", "train-volume.tif"))
    labels = tifffile.imread(data_path("isbi2012", "train-labels.tif"))
    net, spec = load_checkpoint(resolve_model("membrane-em"))
    probs = predict_image(volume[12][..., None], Predictor(net, spec))  # validation slice
    pred = segmentation_from_binary(probs.argmax(axis=0) == 1)
    truth = segmentation_from_binary(labels[12] == 255)
    err = rand_scores(pred, truth)["rand_error"]
    assert err < 0.2, err


def test_unknown_model_name_lists_the_shipped_ones():
    from tilesegment.errors import ModelError

    with pytest.raises(ModelError, match="nuclei-he"):
        resolve_model("no-such-model")


def test_shipped_models_name_their_data_sets_not_a_developers_paths():
    import json

    def strings(doc):
        if isinstance(doc, dict):
            for v in doc.values():
                yield from strings(v)
        elif isinstance(doc, list):
            for v in doc:
                yield from strings(v)
        elif isinstance(doc, str):
            yield doc

    for m in shipped_models():
        doc = json.loads(m.path.with_suffix(".json").read_text())
        absolute = [s for s in strings(doc) if s.startswith(("/", "~")) or s[1:3] == ":\\"]
        assert absolute == [], (m.name, absolute)
        card = m.path.with_suffix(".md").read_text()
        assert "/work/" not in card and "/home/" not in card
    nuclei = json.loads(resolve_model("nuclei-he").with_suffix(".json").read_text())["training"]
    assert nuclei["config"]["train_list"] == "lists/nuclei-he-train.txt"  # made by train.sh
    assert nuclei["config"]["run_dir"] == "nuclei-he"
