"""The power table (cgidm_core.power_table): one stored table that `cgidm check` advises from
and the docs show."""

from pathlib import Path

from benchmarks.power import power_grid, render, smallest
from cgidm_core.power_table import advice, load_table, needed

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_show_the_stored_table():
    table = load_table()
    snippet = render(table)
    assert (REPO / "docs" / "power_table.md").read_text() == snippet
    needs = "\n".join(line for line in snippet.splitlines() if "needed **" in line)
    for name, images, controls in needed(table):
        reached = (f"{images} images and {controls} controls" if images
                   else "more than the table's largest cell")
        assert f"**{name}**" in needs and reached in needs
    readme = (REPO / "README.md").read_text()
    assert all(line in readme for line in snippet.splitlines() if line.startswith("| 10 |"))


def test_a_set_too_small_to_decide_is_told_what_the_table_needs():
    table = load_table()
    rows = needed(table)
    most_images = max(i for _, i, _ in rows if i)
    most_controls = max(c for _, _, c in rows if c)
    text = advice(2, 3, 0.2, table)
    assert text.startswith("too few to decide (2 images, 3 controls, set-level p = 0.2)")
    for name, images, controls in rows:
        assert (f"{name} fine-tune: {images} images and {controls} controls" if images else
                f"for a {name} fine-tune no size in the table reached it") in text
    assert "no set test" in advice(4, 0, None, table)
    assert advice(2, 3, 0.001, table) is None  # already decided
    assert advice(most_images, most_controls, 0.3, table) is None  # big enough: no advice


def test_power_grows_with_the_set_and_zero_where_p_cannot_reach_alpha():
    import numpy as np

    rng = np.random.default_rng(0)
    members = rng.normal(1.0, 1.0, (10, 4))
    controls = rng.normal(0.0, 1.0, (10, 4))
    grid = power_grid(members, controls, fuse=True, reps=15, seed=0, images=(3, 5, 20),
                      control_counts=(5, 10, 20))
    cell = {(c["images"], c["controls"]): c["power"] for c in grid}
    assert cell[3, 5] == 0.0  # smallest possible p = 1 / C(8, 3) = 0.018 > 0.01
    assert cell[20, 20] >= cell[5, 10] and cell[20, 20] > 0.5
    assert smallest([{"images": 5, "controls": 10, "power": 0.9},
                     {"images": 10, "controls": 5, "power": 0.95},
                     {"images": 3, "controls": 5, "power": 0.5}]) == {"images": 5,
                                                                      "controls": 10}


def test_suite_scores_pool_per_strength(tmp_path):
    """`--suite-json`: the verdict's per-image scores of every suite pair, pooled per strength."""
    import json

    from benchmarks.power import suite_strengths
    from benchmarks.render_suite import VERDICT_CANDIDATE

    def pair(pid, shift):
        members = [shift + i / 10 for i in range(10)]
        return {"pair": pid, "strength": pid.split("/")[1],
                "rows": {VERDICT_CANDIDATE: {"auc": 0.9}},
                "scores": {VERDICT_CANDIDATE: [members, [i / 10 for i in range(10)]]}}

    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"pairs": [pair("vangogh-a/light/s0/holdout", 0.5),
                                          pair("vangogh-b/light/s1/holdout", 0.6),
                                          pair("vangogh-a/strong/s0/holdout", 2.0)]}))
    rows = {r["name"]: r for r in suite_strengths(path, reps=10, seed=0)}
    assert set(rows) == {"suite light", "suite strong"}
    assert (rows["suite light"]["n_members"], rows["suite strong"]["n_members"]) == (20, 10)
    strong = {(c["images"], c["controls"]): c["power"] for c in rows["suite strong"]["grid"]}
    assert strong[10, 10] == 1.0 and rows["suite strong"]["needed"] is not None


def test_update_adds_a_row_and_keeps_the_stored_ones():
    """`--update`: a new pair's row joins the stored table (same name replaces) without
    recomputing the other rows; a table measured with other settings is refused."""
    import pytest

    from benchmarks.power import CONTROLS, IMAGES, merged_strengths

    stored = {"reps": 400, "images": list(IMAGES), "controls": list(CONTROLS),
              "strengths": [{"name": "strong", "auc": 1.0}, {"name": "light", "auc": 0.8}]}
    rows = merged_strengths(stored, [{"name": "latent", "auc": 0.7},
                                     {"name": "light", "auc": 0.9}], reps=400)
    assert [(r["name"], r["auc"]) for r in rows] == [("strong", 1.0), ("light", 0.9),
                                                     ("latent", 0.7)]
    with pytest.raises(SystemExit, match="100 reps"):
        merged_strengths({**stored, "reps": 100}, [], reps=400)
