"""The memloc command: demo, scan and localize-benchmark."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from memloc_tl.checkpoints import scan_checkpoints
from memloc_tl.cli import main
from memloc_tl.memorization import scan_memorization
from memloc_tl.organism import Organism


def test_scan_writes_per_paragraph_results(
    organism: Organism, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [*organism.planted.texts(organism.tokenizer)[:4], "far too short"]
    data = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts}).to_csv(data, index=False)
    out = tmp_path / "scan.csv"
    assert (
        main(["scan", "--model", str(organism.path), "--data", str(data), "--out", str(out)]) == 0
    )
    frame = pd.read_csv(out)
    assert len(frame) == 4
    # Independent: re-tokenize the same texts and scan in Python.
    from memloc_tl.core.paragraphs import Paragraphs

    expected = scan_memorization(
        organism.model, Paragraphs.from_texts(texts[:4], organism.model), progress=False
    )
    assert frame["exact_match"].tolist() == expected.exact_match.tolist()
    assert "1 texts too short" in capsys.readouterr().out
    as_json = tmp_path / "scan.json"
    assert (
        main(["scan", "--model", str(organism.path), "--data", str(data), "--out", str(as_json)])
        == 0
    )
    assert pd.read_json(as_json)["exact_match"].tolist() == frame["exact_match"].tolist()


def test_demo_prints_the_summary(
    organism: Organism, organism_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--tiny", "--cache-dir", str(organism_cache)]) == 0
    out = capsys.readouterr().out
    top_repetitions = organism.config.planted_tiers[0][1]
    line = next(
        row for row in out.splitlines() if row.strip().startswith(f"planted x{top_repetitions}")
    )
    n_top = organism.config.planted_tiers[0][0]
    tiers = torch.tensor(organism.planted.meta["tier"])
    memorized = scan_memorization(
        organism.model, organism.planted.select(tiers == 0), progress=False
    ).memorized()
    assert line.split()[2:4] == [str(n_top), str(len(memorized))]
    assert "acceptance passed" in out
    assert "control x1" in out
    assert "first run" not in out  # the suite's organism is cached
    assert "next: memloc report --tiny --out report.html" in out
    # over training: the top tier's memorized count at each checkpoint, as scanned by hand
    series = organism.checkpoints
    assert f"paragraphs memorized at steps {' / '.join(map(str, series.steps))}" in out
    timeline = scan_checkpoints(series, organism.planted.select(tiers == 0), progress=False)
    counts = " / ".join(map(str, timeline.memorized.sum(-1).tolist()))
    assert f"planted x{top_repetitions}  {n_top:>3} paragraphs: {counts}" in out
    assert "is the top head by rare_tokens at the last step" in out


def test_the_first_demo_says_how_long_the_build_takes_and_that_it_is_cached(
    organism: Organism,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import memloc_tl.organism

    built: list[Path | None] = []

    def build(config: object, *, cache_dir: Path | None = None, **kwargs: object) -> Organism:
        built.append(cache_dir)
        return organism  # the message, not another build, is under test

    monkeypatch.setattr(memloc_tl.organism, "build_organism", build)
    assert main(["demo", "--cache-dir", str(tmp_path / "empty")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("first run: building the organism, which usually takes about 5 minutes")
    assert "2 idle CPU cores" in first
    assert f"cached in {tmp_path / 'empty'}" in first
    assert built == [tmp_path / "empty"]


def test_localize_benchmark_writes_the_inj_table(
    organism: Organism, organism_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "inj.csv"
    argv = ["localize-benchmark", "--tiny", "--cache-dir", str(organism_cache), "--level"]
    argv += ["heads", "--methods", "zero_ablation,random", "--paragraphs", "1", "--out", str(out)]
    assert main(argv) == 0
    frame = pd.read_csv(out)
    assert sorted(frame["method"]) == ["random", "zero_ablation"]
    # the exact ablation sweep ranks the injected head first (the truth is in the table)
    assert frame.loc[frame["method"] == "zero_ablation", "rank"].iloc[0] == 1
    assert "zero_ablation" in capsys.readouterr().out
    injections = pd.read_csv(tmp_path / "inj.injections.csv")
    assert injections["succeeded"].tolist() == [True]
    assert {"damaging", "memorized_em_drop", "perplexity_ratio"} <= set(injections.columns)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left over


def test_localize_benchmark_shouts_when_the_injection_fails(
    organism: Organism, organism_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["localize-benchmark", "--tiny", "--cache-dir", str(organism_cache), "--level"]
    argv += ["heads", "--methods", "random", "--paragraphs", "1", "--max-steps", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "WARNING: the injection of seed(s) [0] did not succeed" in captured.err
    assert "Warning:" not in captured.err  # one message per problem, not a Python warning too
    summary = captured.out.splitlines()[-2:]
    assert summary[0].split()[-3:] == ["runs", "failed_runs", "damaging_runs"]
    assert summary[1].split()[-3:] == ["0", "1", "0"]  # the failed run left out, and counted


def test_localize_benchmark_refuses_bad_options_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "empty-cache"  # nothing may be built for a refused command
    base = ["localize-benchmark", "--tiny", "--cache-dir", str(cache)]
    assert main([*base, "--out", str(tmp_path / "x.json")]) == 2
    assert "--out must end in .csv" in capsys.readouterr().err
    assert main([*base, "--level", "heads", "--methods", "gradient"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memloc localize-benchmark: error: --methods: unknown for --level heads")
    assert "oracle" not in err  # a weights-only baseline is not offered for heads
    assert main([*base, "--level", "weights", "--methods", "bogus"]) == 2
    assert "oracle" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit code 2
        main([*base, "--seeds", "0"])
    assert exit_info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert not cache.exists()


def test_cli_errors_are_one_line_with_exit_code_2(
    organism: Organism, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts.csv"
    pd.DataFrame({"text": organism.planted.texts(organism.tokenizer)[:2]}).to_csv(texts)
    model = ["--model", str(organism.path)]
    out = tmp_path / "scan.csv"
    out.write_text("previous results\n")
    bad_column = ["scan", *model, "--data", str(texts), "--out", str(out)]
    bad_column += ["--text-column", "body"]
    cases = {
        "no such file": [
            "scan",
            *model,
            "--data",
            str(tmp_path / "missing.csv"),
            "--out",
            str(out),
        ],
        "no column 'body'": bad_column,
        "must end in .csv or .json": ["scan", *model, "--data", str(texts), "--out", "x.txt"],
        "cannot write into": [
            "scan",
            *model,
            "--data",
            str(texts),
            "--out",
            str(texts / "scan.csv"),
        ],
        "not a checkpoint directory": [
            "scan",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(texts),
            "--out",
            str(out),
        ],
        "has no config.json": [
            "report",
            "--model",
            str(tmp_path),
            "--data",
            str(texts),
            "--out",
            str(tmp_path / "r.html"),
        ],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        last = err.splitlines()[-1]  # earlier lines: progress bars of loading
        assert last.startswith(f"memloc {argv[0]}: error: "), err
        assert expected in last, (argv, err)
    assert out.read_text() == "previous results\n"  # a failed scan leaves the old output
    with pytest.raises(ValueError, match="no column"):  # --debug: the real exception
        main(["--debug", *bad_column])


def test_help_needs_no_torch_and_the_package_loads_lazily() -> None:
    import subprocess
    import sys

    import memloc_tl
    from memloc_tl import cli, models

    assert cli.DEFAULT_MODEL == models.DEFAULT_MODEL
    code = (
        "import sys; from memloc_tl.cli import build_parser; build_parser().format_help(); "
        "import memloc_tl; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    # every public name resolves, from the module the lazy table names
    for name in memloc_tl.__all__:
        assert getattr(memloc_tl, name) is not None
    assert set(memloc_tl.__all__) == {*memloc_tl._SOURCES, "__version__"}


def test_scan_uses_an_id_column_when_the_file_has_one(organism: Organism, tmp_path: Path) -> None:
    texts = organism.planted.texts(organism.tokenizer)[:3]
    data = tmp_path / "texts.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts}).to_csv(data, index=False)
    out = tmp_path / "scan.csv"
    argv = ["scan", "--model", str(organism.path), "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    assert pd.read_csv(out)["id"].tolist() == ["a", "b", "c"]


def test_output_paths_are_checked_and_never_created_unasked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "x"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["scan", "--model", "organism", "--tiny", "--data", str(data)]
    cases = [
        ([*base, "--out", str(tmp_path / "missing" / "x.csv")], "missing does not exist"),
        ([*base, "--out", "x.csv", "--cache-dir", str(blocker)], "--cache-dir"),
        ([*base, "--out", "x.csv", "--cache-dir", str(blocker / "c")], "not a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("memloc scan: error:"), err
        assert message in err, err
    assert not (tmp_path / "missing").exists()  # the folder the user did not ask for
