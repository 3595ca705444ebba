"""stages/model.py: what needs no model weights."""

import itertools

import pytest

from stages.model import length_groups


def padded_tokens(lengths, groups):
    return sum(len(g) * sum(max(lengths[i][k] for i in g) for k in range(len(lengths[0])))
               for g in groups)


@pytest.mark.parametrize("overhead", [0, 16, 64, 10**9])
@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_length_groups_partition_the_rows_within_max_rows(overhead, max_rows):
    lengths = [(p, r) for p, r in itertools.product((9, 12), (1, 4, 5, 32))] * 2
    groups = length_groups(lengths, max_rows, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(0 < len(g) <= max_rows for g in groups)


def test_length_groups_pay_for_a_forward_only_where_the_padding_saved_is_worth_more():
    lengths = [(50, 4)] * 15 + [(50, 32)]
    # One long response: padding the other 15 to it costs 15 x 28 tokens, far more than a forward.
    assert length_groups(lengths, 16, 64) == [[15], list(range(15))]
    # A forward dearer than that padding: one forward of all 16.
    assert [sorted(g) for g in length_groups(lengths, 16, 15 * 28 + 1)] == [list(range(16))]
    # No overhead: the fewest tokens, i.e. no padding at all.
    lengths = [(3, 1), (5, 2), (3, 2), (5, 1)]
    groups = length_groups(lengths, 4, 0)
    assert padded_tokens(lengths, groups) == sum(map(sum, lengths))


def test_length_groups_find_the_cheapest_split():
    lengths = [(4, 1), (2, 6), (7, 3), (1, 1), (5, 5), (3, 2)]
    overhead, max_rows = 6, 3
    best = min(padded_tokens(lengths, gs) + overhead * len(gs)
               for gs in partitions(list(range(len(lengths)))) if max(map(len, gs)) <= max_rows)
    groups = length_groups(lengths, max_rows, overhead)
    # The split is over rows sorted by length, so it may miss an unsorted optimum, but on these
    # rows the sorted optimum is the optimum.
    assert padded_tokens(lengths, groups) + overhead * len(groups) == best


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]


def test_a_shared_prefix_leaves_each_row_a_token_and_is_shared_only_where_it_saves_a_forward():
    from stages.model import PREFIX_MIN_SAVED, shared_prefix, worth_sharing
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2        # the last token stays each row's
    assert shared_prefix([[4, 2], [5, 2]]) == 0
    assert shared_prefix([[7]]) == 0 and shared_prefix([]) == 0
    assert worth_sharing(24, 8)                               # SmolLM2's system turn, 8 rows
    assert not worth_sharing(24, 1) and not worth_sharing(0, 100)
    assert worth_sharing(PREFIX_MIN_SAVED, 2) and not worth_sharing(PREFIX_MIN_SAVED - 1, 2)
