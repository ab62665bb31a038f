"""Pattern and mask stores: round trips, digests, refusal to overwrite, clear errors on foreign stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnmask.errors import AttnmaskError
from attnmask.store.stores import (SiteMask, SitePatterns, read_masks, read_patterns, store_kind, write_masks,
                            write_patterns)

IDENTITY = {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 6}  # what every pattern store records


def site(seed=0, causal=False):
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 5, size=(6, 6)).astype(np.int64)
    return SitePatterns(rng.random((2, 3, 6, 6)) * count, count, causal, {"key_offset": 0})


def test_patterns_round_trip(tmp_path):
    sites = {"encoder.self": site(0), "decoder.self": site(1, causal=True)}
    written = write_patterns(tmp_path / "p.zarr", sites, {**IDENTITY, "sequences": 3})
    loaded = read_patterns(tmp_path / "p.zarr")
    assert store_kind(tmp_path / "p.zarr") == "patterns"
    assert loaded.attrs["digest"] == written.attrs["digest"]
    assert loaded.attrs["format"] == "attnmask.patterns" and loaded.attrs["version"] == 1
    for name, s in sites.items():
        np.testing.assert_array_equal(loaded.sites[name].sum, s.sum)
        np.testing.assert_array_equal(loaded.sites[name].count, s.count)
        assert loaded.sites[name].causal == s.causal
        assert loaded.sites[name].attrs == {"key_offset": 0}


def test_masks_round_trip_and_digest_changes_with_content(tmp_path):
    keep = np.random.default_rng(0).random((2, 2, 5, 5)) > 0.5
    a = write_masks(tmp_path / "a.zarr", {"encoder.self": SiteMask(keep, False, {"tau": 0.5})}, {"tau": 0.5})
    keep2 = keep.copy()
    keep2[0, 0, 0, 0] ^= True
    b = write_masks(tmp_path / "b.zarr", {"encoder.self": SiteMask(keep2, False)}, {"tau": 0.5})
    loaded = read_masks(tmp_path / "a.zarr")
    np.testing.assert_array_equal(loaded.sites["encoder.self"].keep, keep)
    assert loaded.digest == a.digest != b.digest


def test_existing_output_is_refused_and_replaced_only_on_request(tmp_path):
    out = tmp_path / "p.zarr"
    write_patterns(out, {"encoder.self": site(0)}, IDENTITY)
    with pytest.raises(AttnmaskError, match="already exists"):
        write_patterns(out, {"encoder.self": site(1)}, IDENTITY)
    np.testing.assert_array_equal(read_patterns(out).sites["encoder.self"].sum, site(0).sum)
    write_patterns(out, {"encoder.self": site(1)}, IDENTITY, overwrite=True)
    np.testing.assert_array_equal(read_patterns(out).sites["encoder.self"].sum, site(1).sum)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]  # no temporary left behind


def test_a_folder_that_is_not_a_store_is_never_replaced(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "file.txt").write_text("data")
    with pytest.raises(AttnmaskError, match="not an attnmask store"):
        write_patterns(tmp_path / "precious", {"encoder.self": site(0)}, IDENTITY, overwrite=True)
    assert (tmp_path / "precious" / "file.txt").read_text() == "data"


def test_wrong_kind_and_future_version(tmp_path):
    write_patterns(tmp_path / "p.zarr", {"encoder.self": site(0)}, IDENTITY)
    with pytest.raises(AttnmaskError, match="is a patterns store, but a masks store is needed"):
        read_masks(tmp_path / "p.zarr")
    meta = tmp_path / "p.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(AttnmaskError, match="newer than this attnmask"):
        read_patterns(tmp_path / "p.zarr")
    doc["attributes"]["format"] = "something.else"
    meta.write_text(json.dumps(doc))
    with pytest.raises(AttnmaskError, match="not an attnmask store"):
        read_patterns(tmp_path / "p.zarr")
    with pytest.raises(AttnmaskError, match="does not exist"):
        read_patterns(tmp_path / "missing.zarr")
