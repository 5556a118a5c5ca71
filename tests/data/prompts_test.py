"""`read_prompts` from text, JSONL, parquet and a locally built TFDS dataset, and its errors (naming file/field)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d2g_jax.data.prompts import PromptsError, read_prompts


def test_txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog on the moon  \nthird\n")
    assert read_prompts(str(path)) == ["a cat", "a dog on the moon", "third"]
    assert read_prompts(str(path), limit=2) == ["a cat", "a dog on the moon"]
    with pytest.raises(PromptsError, match=r"p\.txt: `field` \('text'\) does not apply"):
        read_prompts(str(path), field="text")


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"caption": "one", "id": 1}, {"caption": "two", "text": "TWO"}, {"prompt": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # default: first of text / caption / prompt present in each line
    assert read_prompts(str(path)) == ["one", "TWO", "three"]
    with pytest.raises(PromptsError, match=r"p\.jsonl:3: no field 'caption' \(has \['prompt'\]\)"):
        read_prompts(str(path), field="caption")
    assert read_prompts(str(path), field="caption", limit=2) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(PromptsError, match=r"bad\.jsonl:2 field: prompt is a int"):
        read_prompts(str(bad))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(PromptsError, match=r"bad\.jsonl:2: invalid JSON"):
        read_prompts(str(bad))
    bad.write_text('{"url": "x"}\n')
    with pytest.raises(PromptsError, match=r"bad\.jsonl:1: none of the prompt fields"):
        read_prompts(str(bad))


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"TEXT": ["a", "b", "c"], "caption": ["x", "y", "z"]}), str(path), row_group_size=2)
    assert read_prompts(str(path)) == ["x", "y", "z"]
    assert read_prompts(str(path), field="TEXT", limit=2) == ["a", "b"]
    with pytest.raises(PromptsError, match=r"p\.parquet \(parquet columns\): no field 'prompt'"):
        read_prompts(str(path), field="prompt")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(PromptsError, match=r"junk\.parquet: cannot read as parquet"):
        read_prompts(str(tmp_path / "junk.parquet"))


def test_missing_and_unknown(tmp_path):
    with pytest.raises(PromptsError, match=r"nope\.txt: prompt file not found"):
        read_prompts(str(tmp_path / "nope.txt"))
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(PromptsError, match=r"p\.csv: unknown prompt file type '\.csv'"):
        read_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptsError, match=r"empty\.txt: no prompts found"):
        read_prompts(str(tmp_path / "empty.txt"))


def test_tfds(tmp_path):
    import tensorflow_datasets as tfds

    class D2gToyCaptions(tfds.core.GeneratorBasedBuilder):
        """A two-feature caption dataset built locally (no download)."""

        VERSION = tfds.core.Version("1.0.0")
        # TFDS looks for checksums/metadata next to a builder's module via importlib resources (fails for a class
        # in a test module, and needs the undeclared `importlib_resources` on py ≥ 3.9); this builder downloads
        # nothing and builds its DatasetInfo directly, so it has no code path.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "caption": tfds.features.Text(),
                "captions": {"text": tfds.features.Sequence(tfds.features.Text())},
            }))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"caption": f"caption {i}", "captions": {"text": [f"first {i}", f"second {i}"]}}

    D2gToyCaptions(data_dir=str(tmp_path)).download_and_prepare()
    got = read_prompts("tfds:d2g_toy_captions", split="train", data_dir=str(tmp_path))
    assert sorted(got) == [f"caption {i}" for i in range(4)]
    nested = read_prompts("tfds:d2g_toy_captions", field="captions/text", data_dir=str(tmp_path), limit=3)
    assert len(nested) == 3 and all(p.startswith("first ") for p in nested)
    with pytest.raises(PromptsError, match=r"tfds:d2g_toy_captions split 'train' example 0: no feature 'captions/url'"):
        read_prompts("tfds:d2g_toy_captions", field="captions/url", data_dir=str(tmp_path))
    with pytest.raises(PromptsError, match=r"tfds:no_such_dataset_xyz split 'train': cannot load"):
        read_prompts("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
