"""Predict metrics against values worked out by hand and against an independent n-gram implementation.

The reference implementation below follows the published definitions (ROUGE-N over distinct n-grams and ROUGE-L over
the longest common subsequence, F = 2PR / (P + R + 1e-8), as rouge_chinese computes them; BLEU-4 over characters with
Chen & Cherry's smoothing 3 and the brevity penalty) without using rouge_chinese or nltk.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest

from stoker.predict.metrics import compute_similarity, similarity, speed_metrics, with_prefix


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    h, r = set(ngrams(hyp, n)), set(ngrams(ref, n))
    p = len(h & r) / len(h) if h else 0.0
    rc = len(h & r) / len(r) if r else 0.0
    return 2 * p * rc / (p + rc + 1e-8)


def lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    n = lcs(hyp, ref)
    p, r = n / len(hyp), n / len(ref)
    return 2 * p * r / (p + r + 1e-8)


def bleu4(pred: str, label: str) -> float:
    counts = []
    for n in range(1, 5):
        h, r = Counter(ngrams(list(pred), n)), Counter(ngrams(list(label), n))
        counts.append((sum(min(c, r[g]) for g, c in h.items()), max(1, sum(h.values()))))
    if counts[0][0] == 0:
        return 0.0
    k, logs = 1, []
    for matched, total in counts:
        if matched:
            logs.append(math.log(matched / total))
        else:  # smoothing 3: the k-th zero precision becomes 1 / (2^k * total)
            logs.append(math.log(1 / (2**k * total)))
            k += 1
    c, r = len(pred), len(label)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(logs) / 4)


def reference_scores(hyp: list[str], ref: list[str], pred: str, label: str) -> dict[str, float]:
    return {
        "rouge-1": round(rouge_n(hyp, ref, 1) * 100, 4),
        "rouge-2": round(rouge_n(hyp, ref, 2) * 100, 4),
        "rouge-l": round(rouge_l(hyp, ref) * 100, 4),
        "bleu-4": round(bleu4(pred, label) * 100, 4),
    }


def test_hand_computed_english_sentence() -> None:
    # Words: hyp {the, cat, sat, on, mat} vs ref {the, cat, is, on, mat}: 4 of 5 shared -> P = R = 0.8.
    # Bigrams: {the cat, on the, the mat} shared of 5 each -> 0.6. LCS "the cat on the mat" = 5 of 6 -> 0.8333.
    scores = similarity("the cat sat on the mat", "the cat is on the mat")
    assert scores["rouge-1"] == 80.0
    assert scores["rouge-2"] == 60.0
    assert scores["rouge-l"] == 83.3333
    # Characters: 22 predicted vs 21 reference (no brevity penalty); the n-gram counting is done below.
    assert scores["bleu-4"] == round(bleu4("the cat sat on the mat", "the cat is on the mat") * 100, 4)


def test_hand_computed_bleu_with_smoothing() -> None:
    # "abc" vs "abd": p1 = 2/3, p2 = 1/2, p3 = 0/1 -> 1/(2*1), p4 = 0/1 (no 4-grams, total floored at 1) -> 1/(4*1).
    # BLEU = (2/3 * 1/2 * 1/2 * 1/4) ** (1/4) = (1/24) ** 0.25 = 0.451801...
    assert similarity("abc", "abd")["bleu-4"] == 45.1801
    # "a" vs "a": p1 = 1, then three smoothed zeros 1/2, 1/4, 1/8 -> (1/64) ** 0.25 = 0.353553...
    assert similarity("a", "a")["bleu-4"] == 35.3553
    # Shorter prediction: "ab" vs "abcd": p1 = 1, p2 = 1, p3 -> 1/2, p4 -> 1/4; BP = exp(1 - 4/2) = e^-1.
    assert similarity("ab", "abcd")["bleu-4"] == round(math.exp(-1) * (1 / 8) ** 0.25 * 100, 4) == 21.8742
    assert similarity("xyz", "abc")["bleu-4"] == 0.0  # no shared character: 0 without smoothing


def test_exact_match_scores_100() -> None:
    assert similarity("Paris is the capital.", "Paris is the capital.") == {
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
        "bleu-4": 100.0,
    }


def test_chinese_is_segmented_by_jieba() -> None:
    import jieba

    pred, label = "我爱北京天安门", "我爱北京"
    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    assert hyp == ["我", "爱", "北京", "天安门"] and ref == ["我", "爱", "北京"]
    # Words: 3 of 4 hyp, 3 of 3 ref -> F = 2 * .75 / 1.75; bigrams 2 of 3 and 2 of 2 -> 0.8; LCS 3 -> as ROUGE-1.
    scores = similarity(pred, label)
    assert scores["rouge-1"] == scores["rouge-l"] == round(2 * 0.75 / 1.75 * 100, 4) == 85.7143
    assert scores["rouge-2"] == 80.0
    assert scores == reference_scores(hyp, ref, pred, label)


@pytest.mark.parametrize(
    ("pred", "label"),
    [
        ("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumps over the lazy fox!"),
        ("细胞理论认为所有生命体都是由细胞构成的。这是生物学的基础。", "细胞理论是生物学的基础理论，认为生命体由细胞构成。"),
        ("Step 1: mix. Step 2: bake at 180C for 20 minutes.", "Mix, then bake for twenty minutes at 180C."),
        ("I am Stoker, an AI assistant.", "Hello! I am {{name}}, an AI assistant developed by {{author}}."),
    ],
)
def test_matches_the_independent_implementation(pred: str, label: str) -> None:
    import jieba

    hyp = " ".join(jieba.cut(pred)).split()
    ref = " ".join(jieba.cut(label)).split()
    assert similarity(pred, label) == reference_scores(hyp, ref, pred, label)


def test_blank_prediction_or_label_scores_zero_rouge() -> None:
    assert similarity("", "something") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert similarity("anything", "") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    # Whitespace only counts as blank for ROUGE; BLEU still sees the shared space characters.
    blank = similarity("   ", "a b")
    assert blank["rouge-1"] == blank["rouge-2"] == blank["rouge-l"] == 0.0
    assert blank["bleu-4"] == round(bleu4("   ", "a b") * 100, 4) > 0


def test_average_is_the_mean_of_rounded_row_scores() -> None:
    preds = ["the cat sat on the mat", "abc", "", "我爱北京天安门"]
    labels = ["the cat is on the mat", "abd", "x", "我爱北京"]
    rows = [similarity(p, lab) for p, lab in zip(preds, labels)]
    result = compute_similarity(preds, labels)
    assert list(result) == ["rouge-1", "rouge-2", "rouge-l", "bleu-4"]
    for key in result:
        assert result[key] == pytest.approx(sum(r[key] for r in rows) / 4, abs=1e-12)
    assert result["rouge-2"] == pytest.approx((60.0 + 0.0 + 0.0 + 80.0) / 4)
    assert compute_similarity([], []) == {}
    with pytest.raises(ValueError):
        compute_similarity(["a"], [])


def test_speed_metrics_round_like_the_trainer() -> None:
    assert speed_metrics("predict", 1.234567, 7, 3) == {
        "predict_runtime": 1.2346,
        "predict_samples_per_second": 5.67,
        "predict_steps_per_second": 2.43,
    }
    assert speed_metrics("predict", 0.0, 7, 3) == {"predict_runtime": 0.0}
    assert with_prefix({"bleu-4": 1.5}, "predict_identity") == {"predict_identity_bleu-4": 1.5}


def test_jieba_stays_quiet() -> None:
    code = "from stoker.predict.metrics import similarity; print(similarity('你好世界', '你好'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.startswith("{'rouge-1': ")
