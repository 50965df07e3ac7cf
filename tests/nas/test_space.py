"""The search space on its own: its size and its checks. The architectures it samples, built into members, are
tested in tests/models/test_nas.py."""

from __future__ import annotations

import pytest

from lightning_ensembles.nas.space import NASSearchSpace
from tests.nas.common import THREE_STAGES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACE = THREE_STAGES


def test_space_size_counts_every_choice() -> None:
    assert SPACE.size == (2 * 2 * 1 * 1 * 2) * (2 * 3 * 3 * 3 * 2) * (2 * 2 * 2 * 2 * 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": []}, r"`--search.space.stages` to be a non-empty list"),
        (
            {"stages": [{"channels": []}]},
            r"`--search.space.stages\[0\].channels` to be a non-empty list of ints",
        ),
        ({"stages": [{"channels": [8], "kernel_sizes": []}]}, r"stages\[0\].kernel_sizes` to be a non-empty"),
        ({"stages": [{"channels": [8], "kernel_sizes": [4]}]}, r"kernel_sizes\[0\]` to be an odd int.*got 4"),
        ({"stages": [{"channels": [8], "se": []}]}, r"stages\[0\].se` to be a non-empty list of booleans"),
        ({"stages": [{"channels": [8]}, {"channels": [8, 8]}]}, r"stages\[1\].channels` to hold distinct"),
        (
            {"stages": [{"channels": [8], "min_blocks": 3, "max_blocks": 2}]},
            r"`--search.space.stages\[0\].min_blocks` \(3\) to be <= `--search.space.stages\[0\].max_blocks` \(2\)",
        ),
        ({"stages": [{"channels": [8], "stride": 3}]}, r"stages\[0\].stride` to be 1 or 2, but got 3"),
        ({"stages": [{"channels": [8], "expand_ratios": [0]}]}, r"expand_ratios\[0\]` to be an int >= 1"),
        ({"stages": [{"channels": [8], "depth": 3}]}, r"stages\[0\]` to have the fields of StageSpace"),
        (
            {"stages": [{"channels": [8]}], "stem_channels": 0},
            r"`--search.space.stem_channels` to be an int >= 1",
        ),
    ],
)
def test_empty_or_contradictory_space_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NASSearchSpace(**kwargs)
