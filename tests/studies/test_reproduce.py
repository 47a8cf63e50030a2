"""scripts/reproduce_gpt_neo_125m.py runs end to end on a local GPT-Neo checkpoint.

The real GPT-Neo 125M weights and the paper's data are never available here, so the script is run
on the tiny organism's checkpoint directory (a GPT-Neo checkpoint the project builds), loaded by
path as the real one would be, with its planted texts as the "memorized" file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch

from memloc_tl import Paragraphs, scan_memorization
from memloc_tl.organism import Organism

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_gpt_neo_125m.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce_gpt_neo_125m", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path: Path, column: str, paragraphs: Paragraphs, tokenizer: object) -> None:
    decode = tokenizer.decode  # type: ignore[attr-defined]
    lines = [json.dumps({column: decode(row.tolist())}) for row in paragraphs.tokens]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_the_reproduction_script_runs_on_a_local_checkpoint(
    organism: Organism, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = organism.model.tokenizer
    memorized, candidates = tmp_path / "mem_strings.jsonl", tmp_path / "candidates.jsonl"
    _write_jsonl(memorized, "paragraph", organism.planted, tokenizer)
    _write_jsonl(
        candidates, "text", Paragraphs.concat(organism.control, organism.heldout), tokenizer
    )
    out = tmp_path / "repro"
    argv = [
        "--model", str(organism.path), "--memorized", str(memorized),
        "--candidates", str(candidates), "--out-dir", str(out), "--paragraphs", "3",
        "--edit-steps", "2", "--edit-lr", "3e-2", "--device", "cpu",
    ]  # fmt: skip
    assert _script().main(argv) == 0

    comparison = pd.read_csv(out / "comparison.csv").set_index("quantity")
    assert list(comparison.columns) == ["paper", "here"]
    assert comparison.loc["memorized paragraphs (EM = 50)", "paper"] == "442"
    # independently: the same texts read back as paragraphs and scanned by the library
    scan = pd.read_parquet(out / "scan.parquet")
    texts = [json.loads(line)["paragraph"] for line in memorized.read_text().splitlines()]
    again = Paragraphs.from_texts(texts, organism.model)
    independent = scan_memorization(organism.model, again, progress=False)
    from_file = scan[scan["id"].str.startswith("memorized-")]
    assert torch.equal(torch.tensor(from_file["exact_match"].to_numpy()), independent.exact_match)
    full = int((scan["exact_match"] == 50).sum())
    assert int(comparison.loc["memorized paragraphs (EM = 50)", "here"]) == full
    assert full >= 2
    assert (out / "report.html").stat().st_size > 100_000
    printed = capsys.readouterr().out
    assert "12.19" in printed
    assert "report.html" in printed


def test_the_reproduction_script_refuses_a_missing_file_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tmp_path / "no-model"), "--memorized", str(tmp_path / "none.csv")]
    argv += ["--candidates", "x", "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        _script().main(argv)
    assert exit_info.value.code == 2
    assert "--memorized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
