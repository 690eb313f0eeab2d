"""Result tables round-trip with their manifests."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest

from cleansight_analysis.errors import InputError
from cleansight_analysis.results import load_manifest, load_table, save_table


@dataclass
class _Settings:
    text_keys: str = "post_image"
    n: int = 3


def test_table_and_manifest_round_trip(tmp_path):
    df = pd.DataFrame({"layer": [0, 1, 2], "ratio": [0.5, 1.25, 2.0], "condition": ["clean", "clean", "triggered"]})
    path = save_table(df, tmp_path / "run", "stealing", settings=_Settings(), attack="badnet", seed=7)
    back = load_table(path)
    pd.testing.assert_frame_equal(back, df)
    pd.testing.assert_frame_equal(load_table(tmp_path / "run" / "stealing"), df)  # stem finds the file
    manifest = load_manifest(path)
    assert manifest["settings"] == {"text_keys": "post_image", "n": 3}
    assert manifest["attack"] == "badnet" and manifest["seed"] == 7
    assert manifest["rows"] == 3 and manifest["columns"] == ["layer", "ratio", "condition"]
    assert manifest["versions"]["torch"]
    assert json.loads((tmp_path / "run" / "stealing.manifest.json").read_text())["table"] == path.name


def test_bad_table_requests(tmp_path):
    df = pd.DataFrame({"a": [1]})
    with pytest.raises(InputError, match="format"):
        save_table(df, tmp_path, "x", fmt="xlsx")
    with pytest.raises(InputError, match="plain file stem"):
        save_table(df, tmp_path, "a/b")
    with pytest.raises(InputError, match="no table"):
        load_table(tmp_path / "missing")
