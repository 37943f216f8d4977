"""Connectivity patterns: in-degree, distinct sources, balance, and the named structures."""

import pytest
import torch

from brickwork.nn.sparse import (
    band,
    block_diagonal,
    from_matrix,
    make_pattern,
    random_pattern,
    ring,
    small_world,
    to_matrix,
    top_k,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("pattern", ["band", "ring", "small_world", "random"])
@pytest.mark.parametrize(("g_out", "g_in", "k"), [(8, 8, 3), (4, 8, 5), (8, 4, 2)])
def test_every_output_group_reads_k_distinct_input_groups(pattern, g_out, g_in, k):
    src = make_pattern(pattern, g_out, g_in, k, p=0.5, generator=torch.Generator().manual_seed(0))
    assert src.shape == (g_out, k)
    assert all(len(set(row)) == k for row in src.tolist())
    assert int(src.min()) >= 0 and int(src.max()) < g_in


def test_random_pattern_reads_every_input_group_equally_often():
    conn = to_matrix(random_pattern(16, 16, 5, torch.Generator().manual_seed(3)), 16)
    assert conn.sum(0).tolist() == [5] * 16 and conn.sum(1).tolist() == [5] * 16
    uneven = to_matrix(random_pattern(8, 16, 3, torch.Generator().manual_seed(3)), 16).sum(0)
    assert int(uneven.max() - uneven.min()) <= 1


def test_named_structures():
    assert to_matrix(block_diagonal(4, 4), 4).equal(torch.eye(4, dtype=torch.bool))
    assert block_diagonal(2, 4).tolist() == [[0, 1], [2, 3]]
    assert band(4, 4, 2).tolist() == [[0, 1], [1, 2], [2, 3], [3, 0]]
    assert ring(4, 4, 3).tolist() == [[3, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]
    assert ring(4, 4, 2).tolist() == [[3, 0], [0, 1], [1, 2], [2, 3]]  # even k: one more group before
    assert ring(4, 4, 4).tolist()[0] == [2, 3, 0, 1]
    assert small_world(6, 6, 2, p=0.0).equal(ring(6, 6, 2).sort(1).values)
    rewired = small_world(16, 16, 2, p=1.0, generator=torch.Generator().manual_seed(0))
    assert not to_matrix(rewired, 16).equal(to_matrix(ring(16, 16, 2), 16))


def test_user_matrix_round_trips_with_padded_slots_marked():
    conn = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    src, real = from_matrix(conn)
    assert src.shape == (3, 3) and real.sum(1).tolist() == [2, 1, 3]
    rebuilt = torch.zeros_like(conn)
    for o in range(3):
        rebuilt[o, src[o][real[o]]] = True
    assert rebuilt.equal(conn)
    assert all(len(set(row)) == 3 for row in src.tolist())


def test_top_k_picks_the_highest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [3.0, 1.0, 2.0, 4.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 3]]


def test_user_matrix_sources_list_the_connected_groups_then_the_padding_in_ascending_order():
    """Stable order with many ties (an unstable sort shuffles them from about 20 on): the real
    slots hold the connected groups ascending, the padded ones the rest ascending."""
    conn = torch.zeros(2, 40, dtype=torch.bool)
    conn[0, ::3] = True  # 14 groups
    conn[1, 1::2] = True  # 20 groups: the largest in-degree
    src, real = from_matrix(conn)
    assert src[0].tolist() == list(range(0, 40, 3)) + [g for g in range(40) if g % 3][:6]
    assert src[1].tolist() == list(range(1, 40, 2))
    assert real.sum(1).tolist() == [14, 20] and real[0, :14].all() and not real[0, 14:].any()
    with pytest.raises(ValueError, match=r"^from_matrix: every output group needs at least one input group$"):
        from_matrix(torch.tensor([[True, False], [False, False]]))


def test_small_world_draws_from_its_generator_only_and_rewires_a_tenth_by_default():
    """The same generator seed gives the same wiring whatever the global RNG did; the default
    rewiring probability is Watts and Strogatz's small p = 0.1 (here: 0.1 of 128 edges)."""
    torch.manual_seed(0)
    a = small_world(32, 32, 4, p=0.5, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    b = small_world(32, 32, 4, p=0.5, generator=torch.Generator().manual_seed(7))
    assert a.equal(b) and not to_matrix(a, 32).equal(to_matrix(ring(32, 32, 4), 32))
    default = small_world(32, 32, 4, generator=torch.Generator().manual_seed(7))
    assert default.equal(small_world(32, 32, 4, p=0.1, generator=torch.Generator().manual_seed(7)))
    moved = int((to_matrix(default, 32) & ~to_matrix(ring(32, 32, 4), 32)).sum())
    assert 0 < moved < 32  # about 13 of the 128 edges moved, far from all of them


def test_to_matrix_stays_on_the_sources_device():
    conn = to_matrix(torch.tensor([[0, 2], [1, 2]], device="meta"), 3)
    assert conn.device.type == "meta" and conn.dtype == torch.bool and conn.shape == (2, 3)
    assert to_matrix(torch.tensor([[0, 2], [1, 2]]), 3).tolist() == [[True, False, True], [False, True, True]]


@pytest.mark.parametrize("pattern", ["random", "small_world"])
def test_random_patterns_draw_from_the_generator_given_only(pattern):
    """The same seed gives the same wiring whatever the global RNG did, also through
    ``make_pattern`` and through random_pattern's repair swaps (8 x 8 at k = 5 needs many)."""
    built = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(5)
        built.append((make_pattern(pattern, 8, 8, 5, p=0.5, generator=gen), random_pattern(6, 9, 4, gen)))
    assert all(a.equal(b) for a, b in zip(*built, strict=True))
    default = make_pattern("small_world", 8, 8, 2, generator=torch.Generator().manual_seed(2))
    assert default.equal(small_world(8, 8, 2, p=0.1, generator=torch.Generator().manual_seed(2)))


def test_block_diagonal_names_the_density_it_can_give():
    with pytest.raises(ValueError) as err:
        make_pattern("block_diagonal", 4, 8, 3)
    assert str(err.value) == (
        "pattern 'block_diagonal' connects each of 4 output groups to G_in / G_out = 2 of 8 input groups, but the "
        "density asks for 3; use density = 2/8 (times edge_density) or pattern 'band' for 3 consecutive groups"
    )
