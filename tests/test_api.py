"""The notebook API (nstjax.stylize, nstjax.sweep): paths, PIL images and arrays give the CLI's
result for the same files; a grid's points equal their solo runs; user errors are one line."""

import numpy as np
import pytest
from PIL import Image

import nstjax
from cli import EXAMPLES
from nstjax import config, images, transfer
from nstjax.errors import UserError

CONTENT, STYLE = EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg"


def small(weights) -> list[str]:
    return [f"model.weights={weights}", "image.size=32", "optim.steps=2", "optim.linesearch=none",
            "model.conv=direct", "progress=false"]


@pytest.fixture(scope="module")
def by_files(synthetic_weights_file):
    """The same run as the product runs it from files (transfer.optimize on the composed config)."""
    cfg = config.compose([*small(synthetic_weights_file), f"content={CONTENT}", f"style={STYLE}", "loss.beta=1000"])
    return transfer.optimize([cfg], log=lambda *_: None)[0]


@pytest.mark.slow
def test_paths_pil_images_and_arrays_give_the_result_of_the_files(synthetic_weights_file, by_files):
    pil = Image.open(CONTENT)
    array = np.asarray(Image.open(STYLE).convert("RGB"))  # uint8
    floats = images.load_image(STYLE)  # float32 in [0, 1]
    for content, style in [(str(CONTENT), STYLE), (pil, array), (CONTENT, floats)]:
        r = nstjax.stylize(content, style, *small(synthetic_weights_file), preset=None, loss={"beta": 1000})
        np.testing.assert_array_equal(r.image, by_files.image)
        assert [h.total for h in r.history] == [h.total for h in by_files.history]
        assert r.metrics["status"] == "finished" and r.metrics["steps"] == 2
        assert r.metrics["total"] == by_files.history[-1].total
        assert r.pil.size == (by_files.image.shape[1], by_files.image.shape[0])
        assert r.overrides[-1] == "loss.beta=1000"


@pytest.mark.slow
def test_a_grid_is_its_points_run_alone_and_a_labelled_sheet(synthetic_weights_file):
    grid = nstjax.sweep(CONTENT, STYLE, {"loss.beta": [100.0, 1e4], "seed": [0]}, *small(synthetic_weights_file),
                        preset=None)
    assert grid.points == [{"loss.beta": 100.0, "seed": 0}, {"loss.beta": 1e4, "seed": 0}]
    alone = nstjax.stylize(CONTENT, STYLE, *small(synthetic_weights_file), "loss.beta=10000.0", "seed=0",
                           preset=None)
    totals = [h.total for h in grid.results[1].history]
    np.testing.assert_allclose(totals, [h.total for h in alone.history], rtol=1e-5)
    assert [row["loss.beta"] for row in grid.table()] == [100.0, 1e4]
    sheet = grid.sheet
    assert sheet.width >= 2 * 160 and sheet.height > 160 * 32 / 43  # two cells of at least 160 px, one row


def test_user_errors_are_one_line(synthetic_weights_file):
    cases = [
        ((CONTENT, STYLE, "loss.nonsense=1"), "nonsense"),
        ((np.zeros((4, 4, 2)), STYLE), "shape"),
        ((np.full((40, 40, 3), 2.0), STYLE), r"\[0, 1\]"),
        ((CONTENT, EXAMPLES / "missing.jpg"), "not found"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message) as e:
            nstjax.stylize(*args, *small(synthetic_weights_file), preset=None) if len(args) == 2 else \
                nstjax.stylize(args[0], args[1], args[2], *small(synthetic_weights_file), preset=None)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="grid"):
        nstjax.sweep(CONTENT, STYLE, {}, *small(synthetic_weights_file), preset=None)
