"""The Python API: the README's examples run as written, the functions agree with the command line's
stages, and every public function refuses bad arguments with one AttnmaskError line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import attnmask
from attnmask.errors import AttnmaskError
from attnmask.store.stores import SitePatterns, read_masks, read_patterns, write_patterns
from conftest import random_texts

REPO = Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    """The ```python blocks of README.md's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_examples_run(tmp_path):
    examples = readme_examples()
    assert len(examples) == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    outputs = []
    for number, code in enumerate(examples):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"README example {number + 1}:\n{r.stderr}"
        outputs.append(r.stdout.splitlines())
    assert outputs[0][0] == "40 ['encoder.self']" and outputs[1][-1] == "rotten-tomatoes train 64"
    assert (tmp_path / "runs/api/minilm-masked/attnmask-masks.zarr").is_dir()
    stored = read_patterns(tmp_path / "runs/api/minilm-rt64.zarr")
    assert stored.attrs["sequences"] == 64 and stored.attrs["data"]["split"] == "train"
    assert read_masks(tmp_path / "runs/api/minilm.tau0.8.masks.zarr").attrs["tau"] == 0.8


def test_in_memory_collection_equals_the_cli_stages(tiny_bert_dir, tmp_path):
    """collect_patterns over a list, over a datasets.Dataset and over a file path gives the sums the
    collector gives; the caller's tokenizer and training mode are left as they were."""
    import datasets
    from transformers import AutoModel, AutoTokenizer

    from attnmask.collect.patterns import collect
    from attnmask.store.data import iter_texts, resolve_data
    from attnmask.models.families import load_adapter

    texts = random_texts(20, seed=7)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    reference = collect(load_adapter(str(tiny_bert_dir)), iter_texts(resolve_data(str(tmp_path / "texts.txt"))),
                        batch_size=32, max_length=24).sites["encoder.self"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tokenizer.padding_side = "left"
    model = AutoModel.from_pretrained(tiny_bert_dir).train()
    from_list = attnmask.collect_patterns(model, tokenizer, texts, max_length=24)
    assert tokenizer.padding_side == "left" and model.training
    from_dataset = attnmask.collect_patterns(model, tokenizer, datasets.Dataset.from_dict({"body": texts}),
                                             text_column="body", max_length=24)
    from_path = attnmask.collect_patterns(str(tiny_bert_dir), None, tmp_path / "texts.txt", max_length=24,
                                          out=tmp_path / "p.zarr")
    for store in (from_list, from_dataset, from_path):
        site = store.sites["encoder.self"]
        np.testing.assert_array_equal(site.count, reference.count)
        np.testing.assert_allclose(site.sum, reference.sum, atol=1e-9)
        assert store.attrs["sequences"] == 20 and store.attrs["max_length"] == 24
    assert from_list.attrs["data"]["examples"] == 20 and from_list.attrs["data"]["digest"].startswith("sha256:")
    assert from_path.attrs["data"]["name"] == str(tmp_path / "texts.txt")
    assert read_patterns(tmp_path / "p.zarr").attrs["digest"] == from_path.attrs["digest"]

    masks = attnmask.compile_masks(from_list, tau=0.5, out=tmp_path / "m.zarr")
    again = attnmask.compile_masks(tmp_path / "p.zarr", tau=0.5)
    assert masks.digest == again.digest and again.path is None
    with attnmask.apply_masks(model.eval(), again) as handle:
        assert handle.store is again


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_bert_dir):
    """A pattern store of the tiny BERT and the model and tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("api")
    model, tokenizer = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    patterns = attnmask.collect_patterns(model, tokenizer, random_texts(8), max_length=16, out=root / "p.zarr")
    return {"root": root, "model": model, "tokenizer": tokenizer, "patterns": patterns}


@pytest.mark.parametrize("call, message", [
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], "a single string is a path", max_length=16),
     "does not exist"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], 42, max_length=16), "texts must be an iterable of strings"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], ["ok", 3], max_length=16), r"texts\[1\] is a int, not a str"),
    (lambda s: attnmask.collect_patterns(s["model"], None, ["ok"]), "needs its tokenizer"),
    (lambda s: attnmask.collect_patterns(object(), s["tokenizer"], ["ok"]), "must be a transformers PreTrainedModel"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], ["ok"], max_length=0), "max_length must be a positive"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], ["ok"], max_length=1000), "exceeds the model's 64"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], [" ", ""], max_length=16), "the dataset is empty"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], ["ok"], text_column="x"), "apply to a data path"),
    (lambda s: attnmask.collect_patterns(s["model"], s["tokenizer"], ["ok"], out=s["root"] / "p.zarr"), "already exists"),
    (lambda s: attnmask.collect_patterns("attnmask-test/no-such-model", None, ["ok"]), "hf download attnmask-test/no-such-model"),
    (lambda s: attnmask.compile_masks(s["patterns"], tau=1.5), r"--tau must lie in \[0, 1\)"),
    (lambda s: attnmask.compile_masks(s["patterns"], scope="row"), "--scope must be one of"),
    (lambda s: attnmask.compile_masks({"not": "a store"}), "patterns must be a PatternStore"),
    (lambda s: attnmask.compile_masks(s["patterns"], site_tau={"decoder.cross": 0.5}), "names site 'decoder.cross'"),
    (lambda s: attnmask.compile_masks(s["root"] / "missing.zarr"), "does not exist"),
    (lambda s: attnmask.apply_masks(s["model"], 5), "masks must be a MaskStore"),
    (lambda s: attnmask.apply_masks("model", s["root"] / "p.zarr"), r"must be a torch model"),
    (lambda s: attnmask.apply_masks(s["model"], s["root"] / "p.zarr"), "is a patterns store, but a masks store"),
    (lambda s: attnmask.apply_masks(s["model"], attnmask.compile_masks(s["patterns"]), backend="fast"), "unknown backend"),
    (lambda s: attnmask.load_model(s["root"] / "nothing"), "does not exist"),
    (lambda s: attnmask.load_model("bert-base-uncased"), r"download it first \(hf download bert-base-uncased\)"),
    (lambda s: attnmask.load_model(3), "takes a model folder or name"),
])
def test_bad_arguments_give_one_line(small, call, message):
    with pytest.raises(AttnmaskError, match=message) as info:
        call(small)
    assert "\n" not in str(info.value)


def test_pattern_stores_need_their_identity(tmp_path):
    """A store without model, data or max_length is refused on write (inspect would fail on it later)."""
    site = SitePatterns(np.zeros((1, 1, 2, 2)), np.ones((2, 2), dtype=np.int64), False)
    with pytest.raises(AttnmaskError, match="lack a valid model, data, max_length"):
        write_patterns(tmp_path / "p.zarr", {"encoder.self": site}, {})
    with pytest.raises(AttnmaskError, match="lack a valid max_length"):
        write_patterns(tmp_path / "p.zarr", {"encoder.self": site}, {"model": {"name": "m"}, "data": {"name": "d"},
                                                                      "max_length": True})
    with pytest.raises(AttnmaskError, match="unknown site 'encoder'"):
        write_patterns(tmp_path / "p.zarr", {"encoder": site}, {})
    assert not (tmp_path / "p.zarr").exists()
    write_patterns(tmp_path / "p.zarr", {"encoder.self": site}, {"model": {"name": "m"}, "data": {"name": "d"},
                                                                  "max_length": 2})
    r = subprocess.run([sys.executable, "-m", "attnmask", "inspect", str(tmp_path / "p.zarr")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0 and "model m, data d, max length 2" in r.stdout, r.stderr


HUB_COLLECT = """
import json, sys
import attnmask
store = attnmask.collect_patterns("attnmask-test/tiny-bert", None, ["a good movie", "the plot"], max_length=8)
print(json.dumps(store.attrs["model"]))
"""


def test_hub_id_in_the_local_cache_is_passed_to_from_pretrained(tiny_bert_dir, tmp_path):
    """A Hub id whose files are in the Hugging Face cache loads offline, like a folder."""
    snapshot = tmp_path / "hub" / "models--attnmask-test--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_bert_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--attnmask-test--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--attnmask-test--tiny-bert" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", HUB_COLLECT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["name"] == "attnmask-test/tiny-bert"
    (tmp_path / "x.txt").write_text("a good movie\n")
    r = subprocess.run([sys.executable, "-m", "attnmask", "collect", "attnmask-test/other", "x.txt"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "hf download attnmask-test/other" in r.stderr


def test_collect_cli_honours_split(tmp_path, tiny_bert_dir):
    import datasets

    parts = {"train": datasets.Dataset.from_dict({"text": random_texts(3, seed=1)}),
             "validation": datasets.Dataset.from_dict({"text": random_texts(5, seed=2)})}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "attnmask", "collect", str(tiny_bert_dir), str(tmp_path / "dd"), "--max-length", "16"]
    r = subprocess.run(base + ["--split", "validation"], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    store = read_patterns(tmp_path / "patterns" / f"{tiny_bert_dir.name}-dd-validation.zarr")
    assert store.attrs["sequences"] == 5 and store.attrs["data"]["split"] == "validation"
    r = subprocess.run(base + ["--split", "nope"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {tmp_path / 'dd'} has no split 'nope' "
                                                      "(has the splits train, validation)")


def test_the_api_does_not_change_the_callers_model_outside_a_handle(small):
    """Applying and removing masks leaves save_pretrained and the attention implementation as they were."""
    model = small["model"]
    before = model.config._attn_implementation
    handle = attnmask.apply_masks(model, attnmask.compile_masks(small["patterns"], tau=0.5))
    assert "save_pretrained" in model.__dict__
    handle.remove()
    assert "save_pretrained" not in model.__dict__ and model.config._attn_implementation == before
