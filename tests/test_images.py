"""The pre/post-attack grid: one row per record, frames coloured by verdict."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmark.images import ABSENT, DETECTED, INVALID, pre_post_grid, save_png


def _record(index: int, pre: dict, post: dict) -> dict:
    return {"prompt_id": str(index), "prompt": f"a circle number {index}", "pre": pre, "post": post,
            "attack": {"text": f"zq xy a circle number {index}"}}


def test_grid_frames_follow_verdicts(tmp_path):
    for name in ("a.png", "b.png"):
        save_png(np.full((32, 32, 3), 128, dtype=np.uint8), tmp_path / name)
    records = [
        _record(0, {"valid": True, "success": False, "image": "a.png"}, {"valid": True, "success": True, "image": "b.png"}),
        _record(1, {"valid": False, "success": None, "image": "a.png"}, {"valid": True, "success": False, "image": "b.png"}),
    ]

    pre_post_grid(records, tmp_path, tmp_path / "grid.png", cell=40)

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    label_width, header, side = 250, 30, 46
    corners = [[grid[header + row * (side + 6) + 1, label_width + 4 + column * (side + 4) + 1] for column in (0, 1)]
               for row in (0, 1)]
    assert [tuple(int(v) for v in pixel) for pixel in corners[0]] == [ABSENT, DETECTED]
    assert [tuple(int(v) for v in pixel) for pixel in corners[1]] == [INVALID, ABSENT]
    assert tuple(grid[header + 20, label_width + 4 + 20]) == (128, 128, 128)
