"""Local dataset files read by r1.data.load_rows, against the datasets library's own reading of the same file."""

import json
from pathlib import Path

from r1.data import load_rows


def test_json_object_reads_as_datasets_reads_it(tmp_path: Path) -> None:
    """A .json file holding one object is one row, as datasets reads it (its lists stay lists)."""
    from datasets import load_dataset

    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["1+1", "2+3", "7-4"], "answer": ["2", "5", "3"]}))
    ref = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert load_rows(str(path), columns=("prompt", "answer")) == [dict(r) for r in ref]

