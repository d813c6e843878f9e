"""bench/claims.py: the interval of a difference of two rates against the published example, the three marks, and the
README's claims on hand-made rates (one answer in 300 decides none of them)."""

import importlib.util
import json

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("claims", REPO / "bench" / "claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def test_the_interval_of_a_difference_is_newcombes():
    # Newcombe (1998), Statistics in Medicine 17:873, table II, example (a): 56/70 - 48/80, method 10: [0.0524, 0.3339]
    assert claims.difference_interval((56, 70), (48, 80)) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    # example (h): 0/10 - 0/20, method 10: [-0.1611, 0.2775]
    assert claims.difference_interval((0, 10), (0, 20)) == pytest.approx((-0.1611, 0.2775), abs=1e-4)


def test_the_marks():
    assert claims.mark(0.01, 0.02, 0.025, "below") == "✓"  # the whole interval under the bound
    assert claims.mark(0.01, 0.03, 0.025, "below") == "~"
    assert claims.mark(0.03, 0.08, 0.025, "below") == "✗"
    assert claims.mark(0.3, 0.5, 0.2, "above") == "✓" and claims.mark(0.1, 0.15, 0.2, "above") == "✗"


def rates(sft=(170, 300), ppo=(290, 300), lag=(9, 300), d0=(285, 300), rect=(9, 300), helpful=(210, 300)):
    """{policy: ((k, n) harmful on harmful prompts, (k, n) helpful on benign prompts)}"""
    runs = {"sft": sft, "ppo": ppo, "reward_shaping": ppo, "ppo_lag": lag, "ppo_lag_d0": d0, "ppo_lag_rectified": rect}
    return {name: (harmful, helpful if name != "sft" else (204, 300)) for name, harmful in runs.items()}


def test_the_readme_claims_on_hand_made_rates():
    listed = claims.claims(rates())
    assert [holds for _, _, holds, _ in listed] == [True] * 7
    # ppo_lag helpful on 209 of 300 against SFT's 204: not shown either way, and "no less helpful" holds
    (_, symbol, holds, numbers) = listed[3]
    assert (symbol, holds) == ("~", True) and numbers.startswith("70.0% [64.6, 74.9] vs 68.0% [62.5, 73.0]")
    # 5% of 300 harmful is 15 answers: "≤ 5%" is not refuted (~); 30 answers (10%) refute it
    assert claims.claims(rates(lag=(15, 300)))[2][1:3] == ("~", True)
    assert claims.claims(rates(lag=(30, 300)))[2][1:3] == ("✗", False)
    # "more harmful by 20 points" must be shown: 95% vs 65% of 300 is; 95% vs 70% (interval from 19.2 points) is not
    assert claims.claims(rates(rect=(195, 300)))[6][1:3] == ("✓", True)
    assert claims.claims(rates(rect=(210, 300)))[6][1:3] == ("~", False)
    assert claims.claims(rates(rect=(234, 300)))[6][1:3] == ("~", False)


def test_the_seeds_answers_pool(tmp_path):
    for run, harmful in (("s0", 6), ("s1", 12)):
        policies = {
            name: {
                "harmful_prompts": {"answers": 300, "oracle_harmful_rate": k / 300},
                "benign_prompts": {"answers": 300, "oracle_helpful_rate": 0.7},
            }
            for name, ((k, _), _) in rates(lag=(harmful, 300)).items()
        }
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "labels.json").write_text(json.dumps({"policies": policies}))
    pooled = claims.pooled([claims.rates(tmp_path / run) for run in ("s0", "s1")])
    assert pooled["ppo_lag"] == ((18, 600), (420, 600))
