"""quadlib.profile: a finished run's time per notebook cell, selection and model, read from its records."""

import json

import nbformat
import pytest

from quadlib.cli import main
from quadlib.profile import cell_times, profile


def executed(path, cells):
    """An executed notebook: `cells` is a list of ("md", text) and ("code", source, seconds, tags)."""
    nb = nbformat.v4.new_notebook()
    for cell in cells:
        if cell[0] == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(cell[1]))
        else:
            code = nbformat.v4.new_code_cell(cell[1])
            code.metadata["tags"] = list(cell[3]) if len(cell) > 3 else []
            if cell[2] is not None:
                code.metadata["papermill"] = {"duration": cell[2]}
            nb.cells.append(code)
    nbformat.write(nb, path)


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


@pytest.fixture
def finished(tmp_path):
    reports, run = tmp_path / "reports", tmp_path / "run"
    reports.mkdir()
    executed(reports / "01_cluster.ipynb", [("code", "K = 8", 0.5, ["parameters"]), ("md", "## Embeddings\ntext"),
                                            ("code", "embed()", 6.0), ("code", "# a comment\ncluster()", 2.0)])
    executed(reports / "03_bandit.ipynb", [("code", "select_all()", 11.5)])
    write(run / "select-quad/manifest.json", {"method": "quad", "wall_time_s": 2.0})
    write(run / "select-random/manifest.json", {"method": "random", "wall_time_s": 0.25})
    write(run / "selection-seeds/seed-1/select-quad/manifest.json", {"method": "quad", "wall_time_s": 1.5})
    write(run / "eval/quad/seed-0/metrics.json", {"train": {"seconds": 4.0}, "eval_seconds": 6.0})
    write(run / "eval/quad/seed-1/metrics.json", {"train": {"seconds": 3.0}, "eval_seconds": 5.0})
    write(run / "eval/untrained/seed-0/metrics.json", {"eval_seconds": 7.0})
    write(run / "eval/ablate-alpha=1/seed-0/metrics.json", {"train": {"seconds": 1.0}, "eval_seconds": 2.0})
    write(run / "eval/ablate-alpha=3/seed-0/metrics.json", {"train": {"seconds": 1.5}, "eval_seconds": 2.5})
    return run, reports


def test_cells_are_timed_and_named_as_the_progress_lines_name_them(finished):
    run, reports = finished
    cells = cell_times(reports)
    assert cells["notebook"].tolist() == ["01_cluster"] * 3 + ["03_bandit"]  # NOTEBOOKS order, absent ones skipped
    assert cells["cell"].tolist() == [1, 2, 3, 1]
    assert cells["title"].tolist() == ["parameters", "Embeddings", "cluster()", "select_all()"]
    assert cells["seconds"].tolist() == [0.5, 6.0, 2.0, 11.5]


def test_profile_shares_selections_and_models(finished):
    run, reports = finished
    parts = profile(run, reports)
    cells, notebooks = parts["cells"], parts["notebooks"]
    assert cells["share"].sum() == pytest.approx(1.0)
    assert cells.loc[cells["title"] == "select_all()", "share"].item() == pytest.approx(11.5 / 20.0)
    assert notebooks.set_index("notebook")["seconds"].to_dict() == {"01_cluster": 8.5, "03_bandit": 11.5}
    selections = parts["selections"].set_index("method")
    assert selections.index.tolist() == ["quad", "random"]  # slowest first
    assert selections.loc["quad", "seeds"] == 2 and selections.loc["quad", "seconds"] == pytest.approx(3.5)
    models = parts["models"].set_index("method")
    assert models.loc["quad", "models"] == 2
    assert (models.loc["quad", "train_seconds"], models.loc["quad", "eval_seconds"]) == (7.0, 11.0)
    assert models.loc["ablation grids", "models"] == 2  # every eval/ablate-* model in one row
    assert models.loc["ablation grids", "eval_seconds"] == pytest.approx(4.5)
    assert models.loc["untrained", "train_seconds"] == 0.0
    assert models.index[0] == "quad"  # most evaluation seconds first


def test_profile_command_prints_the_tables(finished, capsys):
    run, reports = finished
    main(["profile", "--run", str(run), "--reports", str(reports)])
    out = capsys.readouterr().out
    assert "wall time of the executed notebooks: 20.0 s" in out
    assert "57.5%" in out  # 03_bandit's share


def test_an_unexecuted_notebook_or_an_empty_folder_is_refused_in_one_line(tmp_path, capsys):
    executed(tmp_path / "02_score.ipynb", [("code", "fit()", None)])
    with pytest.raises(ValueError, match=r"02_score.ipynb: code cell 1 has no papermill duration"):
        cell_times(tmp_path)
    with pytest.raises(SystemExit):
        main(["profile", "--run", str(tmp_path), "--reports", str(tmp_path / "none")])
    assert "no executed notebook" in capsys.readouterr().err
