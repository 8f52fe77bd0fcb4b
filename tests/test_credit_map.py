"""The GCPO-guidance credit-map renderer (grouprl_trl/credit_map.py) on hand-made batches: which
prompts it shows, the colour of each token by the sign of its advantage, the weight printed under
each token, and the step in the file name."""

from __future__ import annotations

import re

import pytest

from grouprl_trl.credit_map import (NEGATIVE_RGB, NEUTRAL_RGB, POSITIVE_RGB, render_credit_map, select_groups,
                                    write_credit_map)

CELL = re.compile(r"<span class='t' style='background:rgba\((\d+),(\d+),(\d+),([\d.]+)\);[^']*' "
                  r"title='w = ([\d.]+), d = ([\d.]+)'><span class='s'>([^<]*)</span><span class='w'>([^<]*)</span>")


def _batch():
    """Three prompts x 4 completions. Group 'same' has equal rewards (no credit), 'one' one right
    answer, 'mixed' rewards 1, 0.5, 0.5, 0. Every token string is unique: '<completion>:<position>'."""
    groups = {"same": [1.0, 1.0, 1.0, 1.0], "one": [0.0, 1.0, 0.0, 0.0], "mixed": [0.5, 0.0, 1.0, 0.5]}
    batch = dict(completions=[], weights=[], divergences=[], rewards=[], advantages=[], group_ids=[], prompts=[])
    i = 0
    for group, rewards in groups.items():
        mean = sum(rewards) / len(rewards)
        for reward in rewards:
            length = 2 + i % 3
            batch["completions"].append([f"c{i}:{t}" for t in range(length)])
            batch["weights"].append([0.5 + 0.25 * t + 0.1 * (i % 2) for t in range(length)])
            batch["divergences"].append([0.01 * (t + 1) for t in range(length)])
            batch["rewards"].append(reward)
            batch["advantages"].append(reward - mean)  # the sign is what the colour follows
            batch["group_ids"].append(group)
            batch["prompts"].append(f"prompt-{group}")
            i += 1
    return batch


def test_selects_prompts_whose_completions_differ():
    batch = _batch()
    assert select_groups(batch["rewards"], batch["group_ids"]) == ["one", "mixed"]
    assert select_groups(batch["rewards"], batch["group_ids"], max_groups=1) == ["one"]
    page = render_credit_map(step=3, **batch)
    assert "prompt-one" in page and "prompt-mixed" in page and "prompt-same" not in page
    shown = {cell[6].split(":")[0] for cell in CELL.findall(page)}
    assert shown == {f"c{i}" for i in range(4, 12)}  # every completion of the two groups, none of 'same'


def test_rows_best_first_and_both_ends_when_cut():
    batch = _batch()
    page = render_credit_map(step=3, max_groups=1, **batch)  # group 'one': rewards 0, 1, 0, 0 (c4..c7)
    order = list(dict.fromkeys(cell[6].split(":")[0] for cell in CELL.findall(page)))
    assert order == ["c5", "c4", "c6", "c7"]  # the rewarded one first, then batch order
    page = render_credit_map(step=3, max_per_group=2, **batch)
    order = list(dict.fromkeys(cell[6].split(":")[0] for cell in CELL.findall(page)))
    assert order == ["c5", "c7", "c10", "c9"]  # best and worst of each group
    assert "2 more not shown" in page


def test_token_colour_follows_the_sign_and_weight_is_printed():
    batch = _batch()
    page = render_credit_map(step=3, **batch)
    cells = CELL.findall(page)
    shown_weights = [w for i in range(4, 12) for w in batch["weights"][i]]
    top = max(shown_weights)
    assert len(cells) == len(shown_weights)
    for r, g, b, alpha, w_title, d_title, token, w_text in cells:
        i, t = (int(x) for x in token[1:].split(":"))
        advantage, weight = batch["advantages"][i], batch["weights"][i][t]
        expected = POSITIVE_RGB if advantage > 0 else NEGATIVE_RGB if advantage < 0 else NEUTRAL_RGB
        assert (int(r), int(g), int(b)) == expected, token
        assert float(alpha) == pytest.approx(0.06 + 0.84 * weight / top, abs=0.006)  # darker = larger weight
        assert w_text == f"{weight:.1f}" and float(w_title) == pytest.approx(weight, abs=5e-4)
        assert float(d_title) == pytest.approx(batch["divergences"][i][t], abs=5e-5)
    # a completion of each sign and a zero advantage (c8, c11: reward 0.5 = the group mean) are all shown
    assert {batch["advantages"][i] > 0 for i in range(4, 12)} == {True, False}
    assert batch["advantages"][8] == 0.0 and any(c[6].startswith("c8:") and c[:3] == tuple(map(str, NEUTRAL_RGB))
                                                 for c in cells)
    # each completion's reward and advantage, and a legend naming both colours
    assert "reward <b>1.00</b>" in page and "A = +0.750" in page and "A = -0.250" in page
    assert f"rgba({','.join(map(str, POSITIVE_RGB))}" in page and "pushed up" in page
    assert f"rgba({','.join(map(str, NEGATIVE_RGB))}" in page and "pushed down" in page


def test_file_name_and_title_carry_the_logged_step(tmp_path):
    path = write_credit_map(tmp_path / "credit_maps", 12, **_batch())
    assert path == tmp_path / "credit_maps" / "step_000012.html"
    text = path.read_text(encoding="utf-8")
    assert "step 12</h1>" in text and "Step 12:" in text


def test_a_batch_without_credit_says_so_and_bad_shapes_are_errors():
    batch = _batch()
    batch["rewards"] = [1.0] * len(batch["rewards"])
    page = render_credit_map(step=1, **batch)
    assert "No prompt in this batch has completions with different rewards" in page and not CELL.findall(page)
    batch = _batch()
    batch["weights"][5] = batch["weights"][5][:-1]
    with pytest.raises(ValueError, match="completion 5 has 4 tokens, 3 weights"):
        render_credit_map(step=1, **batch)


def test_tokens_are_escaped():
    batch = dict(completions=[["<b>", " "], ["\n", "&"]], weights=[[1, 1], [1, 1]], divergences=[[0, 0], [0, 0]],
                 rewards=[1, 0], advantages=[1, -1], group_ids=[0, 0])
    page = render_credit_map(step=1, **batch)
    assert "&lt;b&gt;" in page and "<b>\u00b7" not in page and "\u21b5" in page and "&amp;" in page
