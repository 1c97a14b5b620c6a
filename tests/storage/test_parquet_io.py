"""Metadata previews of stored tables read as their types hold them."""

import numpy as np
import pyarrow as pa

from interp_assets.storage.parquet import markdown_preview


def test_preview_shows_floats_with_the_digits_their_type_holds() -> None:
    table = pa.table(
        {
            "activation": pa.array(np.array([0.387939453125, 12.5], dtype=np.float16)),
            "score": pa.array([0.1, 1 / 3], pa.float32()),
            "p_value": [1 / 3, 2e-12],
            "label": ["a | b", None],
        }
    )
    lines = markdown_preview(table).splitlines()
    assert lines[2] == "| 0.388 | 0.1 | 0.3333333333333333 | a \\| b |"
    assert lines[3] == "| 12.5 | 0.33333334 | 2e-12 |  |"
