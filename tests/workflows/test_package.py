"""workflows/models/package.py: one read of the run's log.csv serves the wall time and the
stopped-early sentence of the card."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT

LOG = """epoch,step,train_loss,val_loss,lr,seconds
0,0,,1.4,0.001,45.0
1,130,0.96,0.82,0.00099,502.7
2,260,0.71,0.66,0.00098,
3,390,0.65,0.61,0.00097,1252.3
"""


def load_package():
    spec = importlib.util.spec_from_file_location(
        "package_py", ROOT / "workflows" / "models" / "package.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_rows_serve_hours_and_stopped(tmp_path):
    package = load_package()
    (tmp_path / "log.csv").write_text(LOG)
    rows = package.log_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert package.training_hours(rows) == (45.0 + 502.7 + 1252.3) / 3600
    assert package._stopped(rows, {"epochs": 3}) == ""
    assert "stopped after epoch 3 of 20" in package._stopped(rows, {"epochs": 20})
