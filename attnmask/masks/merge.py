"""Add pattern stores collected from the same model and settings on different data.

For stores A_1 .. A_n with the same model (family and config digest), max_length, sites and shapes:

    sum[site]   = Σ_i sum_i[site]      float64 [L, H, Q, K]
    count[site] = Σ_i count_i[site]    int64   [Q, K]
    sequences, tokens = Σ_i of each

which is what one collection over the concatenated data would hold (up to float64 rounding). Tile stores
(`collect --block-size B`) merge the same way, tile by tile, with tile stores of the same B only. The
merged store's data identity lists the parts (name, path, digest of each dataset); a dataset that
appears in two inputs is refused, since its sequences would be counted twice.
"""

from __future__ import annotations

import numpy as np

from attnmask.errors import AttnmaskError
from attnmask.store.stores import PatternStore, SitePatterns


def data_parts(store: PatternStore) -> list[dict]:
    """The datasets a store was collected on (one, or the parts of a merged store)."""
    data = store.attrs.get("data")
    if not isinstance(data, dict):
        raise AttnmaskError(f"{store.path} has no data identity")
    parts = data.get("parts")
    return [dict(p) for p in parts] if isinstance(parts, list) else [dict(data)]


def tile_text(tile: int) -> str:
    return f"a tile store of {tile}x{tile} tiles" if tile > 1 else "an element store"


def check_mergeable(stores: list[PatternStore]) -> None:
    """Same model, max_length, tile, sites, shapes and causality; no dataset twice."""
    if len(stores) < 2:
        raise AttnmaskError("merge needs at least two pattern stores")
    first = stores[0]
    model = first.attrs.get("model") or {}
    for other in stores[1:]:
        theirs = other.attrs.get("model") or {}
        for key in ("family", "config_digest"):
            if model.get(key) != theirs.get(key):
                raise AttnmaskError(f"{other.path} comes from a different model than {first.path} "
                                    f"({key} {theirs.get(key)!r} vs {model.get(key)!r})")
        if other.attrs.get("max_length") != first.attrs.get("max_length"):
            raise AttnmaskError(f"{other.path} was collected with max_length {other.attrs.get('max_length')}, "
                                f"{first.path} with {first.attrs.get('max_length')}")
        if other.tile != first.tile:
            raise AttnmaskError(f"{other.path} is {tile_text(other.tile)}, {first.path} {tile_text(first.tile)}; "
                                "merge only stores of one tile")
        if sorted(other.sites) != sorted(first.sites):
            raise AttnmaskError(f"{other.path} has sites {sorted(other.sites)}, {first.path} has {sorted(first.sites)}")
        for name, site in first.sites.items():
            o = other.sites[name]
            if o.sum.shape != site.sum.shape or o.count.shape != site.count.shape or o.causal != site.causal:
                raise AttnmaskError(f"site {name}: {other.path} has shape {list(o.sum.shape)} (causal {o.causal}), "
                                    f"{first.path} has {list(site.sum.shape)} (causal {site.causal})")
    seen: dict[str, str] = {}
    for store in stores:
        for part in data_parts(store):
            digest = part.get("digest")
            if digest in seen:
                raise AttnmaskError(f"{store.path} and {seen[digest]} were both collected on {part.get('name')} "
                                    f"({digest}); merging would count it twice")
            seen[digest] = str(store.path)


def merge_patterns(stores: list[PatternStore]) -> tuple[dict[str, SitePatterns], dict]:
    """(sites, identity attributes) of the sum of `stores` (see the module docstring)."""
    check_mergeable(stores)
    first = stores[0]
    sites = {}
    for name, site in first.sites.items():
        total = np.zeros_like(site.sum, dtype=np.float64)
        count = np.zeros_like(site.count, dtype=np.int64)
        for store in stores:
            total += store.sites[name].sum
            count += store.sites[name].count
        sites[name] = SitePatterns(total, count, site.causal, dict(site.attrs), tile=site.tile)
    parts = [{**part, "store": str(store.path), "store_digest": store.attrs.get("digest")}
             for store in stores for part in data_parts(store)]
    attrs = {
        "model": first.attrs.get("model"),
        "data": {"name": "+".join(str(p.get("name")) for p in parts), "parts": parts},
        "sequences": int(sum(int(s.attrs.get("sequences", 0)) for s in stores)),
        "tokens": int(sum(int(s.attrs.get("tokens", 0)) for s in stores)),
        "max_length": first.attrs.get("max_length"),
    }
    return sites, attrs
