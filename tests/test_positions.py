"""Positions of a model's tokens (``moe_gen.model.positions``), by hand-worked examples."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_gen.model import flavour
from moe_gen.model.positions import check_positions, location_basis, positions_in_sample, side_positions
from moe_gen.tasks.batch import Side


def _side(sample_BS: list[list[int]], padding_BS: list[list[bool]], is_token_BS: list[list[bool]]) -> Side:
    """A side of the given sample ids, padding and token positions (token ids 5; pad id 0)."""
    B, S = len(sample_BS), len(sample_BS[0])
    side = Side.from_token_ids([[5] * S] * B, pad_id=0, num_modalities=2)
    padding = torch.tensor(padding_BS)
    return dataclasses.replace(side, padding_mask=padding, is_token=torch.tensor(is_token_BS) & ~padding,
                               tags=dataclasses.replace(side.tags, sample=torch.tensor(sample_BS)))


def test_location_basis_by_hand():
    """3 bins sit at u = 0, 1/2, 1; frequency j turns by 2^j·π over the image: sin columns, then cos."""
    half, full = math.pi / 2, math.pi
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0],
                             [math.sin(half), math.sin(full), math.cos(half), math.cos(full)],
                             [math.sin(full), math.sin(2 * full), math.cos(full), math.cos(2 * full)]])
    torch.testing.assert_close(location_basis(3, 2), expected)
    # the coarsest frequency separates the two halves: bins 0 and num_bins - 1 are opposite in cos
    basis = location_basis(1000, 8)
    assert basis.shape == (1000, 16) and basis[0, 8] == 1.0 and basis[-1, 8] == pytest.approx(-1.0)
    torch.testing.assert_close(location_basis(1, 3), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))  # no 0/0


def test_positions_restart_wherever_the_sample_id_changes_in_every_row():
    sample_BS = torch.tensor([[0, 0, 1, 1, 1, 2],
                              [0, 0, 0, 0, 0, 0],
                              [2, 2, 0, 0, 0, 1]])  # ids need not increase along a row
    assert positions_in_sample(sample_BS).tolist() == [[0, 1, 0, 1, 2, 0],
                                                      [0, 1, 2, 3, 4, 5],
                                                      [0, 1, 0, 1, 2, 0]]


def test_side_positions_are_the_given_ones_where_a_side_has_them():
    side = _side([[0, 0, 0, 1]], [[False] * 4], [[True] * 4])
    assert side_positions(side).tolist() == [[0, 1, 2, 0]]
    given = torch.tensor([[3, 0, 7, 1]])  # a masked sample's places in its modality streams
    assert side_positions(dataclasses.replace(side, position_ids=given)).tolist() == given.tolist()


def test_check_positions_allows_the_last_row_of_the_table_and_refuses_one_past_it():
    config = flavour("debug", max_positions=4)
    side = _side([[0] * 5], [[False] * 5], [[True] * 5])
    check_positions(torch.tensor([[0, 1, 2, 3, 3]]), side, config)  # position 3 = max_positions - 1 reads the last row
    with pytest.raises(ValueError, match=r"reaches position 4, past the learned position table "
                                         r"\(ModelConfig.max_positions=4\)"):
        check_positions(torch.tensor([[0, 1, 2, 3, 4]]), side, config)


@pytest.mark.parametrize("on_features", [True, False])
def test_check_positions_passes_over_padding_always_and_feature_positions_where_they_read_no_table(on_features):
    config = flavour("debug", max_positions=4, positions_on_features=on_features)
    positions = torch.tensor([[0, 1, 2, 3, 4]])
    padded = _side([[0] * 5], [[False] * 4 + [True]], [[True] * 5])
    check_positions(positions, padded, config)  # padding reads the last row, unchecked
    feature_last = _side([[0] * 5], [[False] * 5], [[True] * 4 + [False]])
    if on_features:
        with pytest.raises(ValueError, match="reaches position 4"):
            check_positions(positions, feature_last, config)
    else:
        check_positions(positions, feature_last, config)  # a feature position takes no row of the table
    token_last = _side([[0] * 5], [[False] * 5], [[False] * 4 + [True]])
    with pytest.raises(ValueError, match="reaches position 4"):
        check_positions(positions, token_last, config)
